// Command kmesh-cni will be Kmesh's chained CNI plugin for clusters without
// istio-cni (see ROADMAP.md). Until then it answers the CNI VERSION command
// and refuses the others with a CNI error that says what to install instead,
// so a runtime that calls it fails loudly rather than silently.
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	enc := json.NewEncoder(os.Stdout)
	switch os.Getenv("CNI_COMMAND") {
	case "VERSION":
		_ = enc.Encode(map[string]any{"cniVersion": "1.0.0", "supportedVersions": []string{"0.4.0", "1.0.0"}})
	default:
		_ = enc.Encode(map[string]any{
			"cniVersion": "1.0.0",
			"code":       100,
			"msg":        "kmesh-cni enrolment is not available yet",
			"details":    "install istio-cni (istioctl install --set profile=kmesh does) and Kmesh enrols pods over ZDS",
		})
		fmt.Fprintln(os.Stderr, "kmesh-cni: only CNI_COMMAND=VERSION is supported in this release")
		os.Exit(1)
	}
}
