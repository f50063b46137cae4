// Command cluster-bins builds the cluster tier's control-plane binaries
// (etcd, kube-apiserver, kube-controller-manager, pilot-discovery,
// istioctl) into their cache, so that the tests find them built (make
// cluster-bins). It prints each binary's path.
//
//	go run ./integration/cmd/cluster-bins [name...]
package main

import (
	"fmt"
	"log"
	"os"

	"kmesh.dev/kmesh/integration/cluster/bins"
)

func main() {
	log.SetFlags(0)
	b, err := bins.New()
	if err != nil {
		log.Fatal(err)
	}
	b.Log = func(f string, a ...any) { log.Printf(f, a...) }
	names := os.Args[1:]
	if len(names) == 0 {
		names = bins.All
	}
	for _, n := range names {
		p, err := b.Path(n)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s %s\n", n, p)
	}
}
