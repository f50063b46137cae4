// Command testsummary runs `go test -json ...`, prints what a person needs
// (package results, the output of failing tests, a closing count) and fails
// when a privileged test was skipped while KMESH_REQUIRE_PRIVILEGED is set:
// in CI every tier must really run.
//
//	go run ./integration/cmd/testsummary go test -json ./...
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testsummary go test -json [args]")
		os.Exit(2)
	}
	cmd := exec.Command(os.Args[1], os.Args[2:]...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var passed, failed, skipped int
	var privSkipped, failures []string
	logs := map[string]*strings.Builder{} // package/test -> output
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			fmt.Println(sc.Text()) // build errors and the like
			continue
		}
		// Subtests' output goes to their top-level test's log, which is
		// printed when that test fails: a failing subtest's messages are
		// what a person needs.
		top, _, _ := strings.Cut(e.Test, "/")
		key := e.Package + " " + top
		switch e.Action {
		case "output":
			b := logs[key]
			if b == nil {
				b = &strings.Builder{}
				logs[key] = b
			}
			b.WriteString(e.Output)
		case "pass", "fail", "skip":
			if e.Test == "" {
				// Package result: print go test's usual closing line for it.
				status := map[string]string{"pass": "ok  ", "fail": "FAIL", "skip": "?   "}[e.Action]
				note := ""
				if e.Action == "skip" {
					note = "\t[no test files]"
				}
				fmt.Printf("%s\t%s\t%.3fs%s\n", status, e.Package, e.Elapsed, note)
				if e.Action == "fail" && logs[key] != nil {
					fmt.Print(logs[key].String())
				}
				continue
			}
			if strings.Contains(e.Test, "/") {
				continue // subtests are reported through their parents
			}
			switch e.Action {
			case "pass":
				passed++
			case "fail":
				failed++
				failures = append(failures, key)
				if b := logs[key]; b != nil {
					fmt.Print(b.String())
				}
			case "skip":
				skipped++
				if strings.HasPrefix(e.Test, "TestPrivileged") {
					privSkipped = append(privSkipped, key)
				}
			}
			delete(logs, key)
		}
	}
	werr := cmd.Wait()
	sort.Strings(failures)
	for _, f := range failures {
		fmt.Println("FAILED:", f)
	}
	code := 0
	if werr != nil || failed > 0 {
		code = 1
	}
	if len(privSkipped) > 0 {
		fmt.Printf("privileged tests skipped (%d): %s\n", len(privSkipped), strings.Join(privSkipped, ", "))
		if os.Getenv("KMESH_REQUIRE_PRIVILEGED") != "" {
			fmt.Println("KMESH_REQUIRE_PRIVILEGED is set: a skipped privileged test is a failure")
			code = 1
		}
	}
	fmt.Printf("wall time %s\n", time.Since(start).Round(time.Second))
	fmt.Printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	os.Exit(code)
}
