// Package charttest tests the Helm chart manifests/charts/kmesh: lint, the
// rendered objects decoded into Kubernetes types and checked against the
// ztunnel drop-in contract, the values schema, and the chart's environment
// against the variables the daemon reads. Only its tests import Helm, so no
// binary links it.
package charttest
