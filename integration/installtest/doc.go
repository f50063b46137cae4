// Package installtest holds the install tests: profiles/kmesh.yaml rendered
// in-process by istioctl's own code (istio.io/istio/operator/pkg/render,
// what `istioctl manifest generate` and `istioctl install` call) from the
// install package `make manifests` assembles, and the image `make image`
// builds. Its code is all in _test.go files, so istioctl's packages reach no
// binary.
package installtest
