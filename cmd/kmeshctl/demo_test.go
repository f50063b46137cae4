package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestFindSim(t *testing.T) {
	notInPath := func(string) (string, error) { return "", exec.ErrNotFound }
	inPath := func(name string) (string, error) { return "/usr/local/bin/" + name, nil }

	next := t.TempDir()
	if err := os.WriteFile(filepath.Join(next, simBinary), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec := t.TempDir()
	if err := os.WriteFile(filepath.Join(notExec, simBinary), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, dir string
		lookPath  func(string) (string, error)
		want      string
	}{
		{"next to kmeshctl wins over PATH", next, inPath, filepath.Join(next, simBinary)},
		{"PATH when not next to kmeshctl", t.TempDir(), inPath, "/usr/local/bin/" + simBinary},
		{"a file that cannot run is skipped", notExec, inPath, "/usr/local/bin/" + simBinary},
		{"no executable path known", "", inPath, "/usr/local/bin/" + simBinary},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := findSim(tc.dir, tc.lookPath)
			if err != nil || got != tc.want {
				t.Fatalf("findSim = %q, %v; want %q", got, err, tc.want)
			}
		})
	}

	// Absent everywhere: the error says what to do.
	dir := t.TempDir()
	_, err := findSim(dir, notInPath)
	if err == nil {
		t.Fatal("found a simulator that does not exist")
	}
	for _, want := range []string{simBinary, dir, "PATH", "make build"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if errors.Is(err, exec.ErrNotFound) {
		t.Errorf("error %q leaks LookPath's error instead of saying what to do", err)
	}
}
