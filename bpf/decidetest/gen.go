// Package decidetest runs the kernel's connect decision (kmesh_decide.h:
// frontend lookup, load-balancing draw, path verdict) through BPF_PROG_RUN
// with chosen inputs, on a loaded data path's maps. For tests only: table
// tests of the C decisions, and the differential test that the kernel's
// choice equals user space's (ambient/dataplane Pick) for the same random
// numbers.
package decidetest

//go:generate sh -c "go tool bpf2go -tags linux -cc clang -target bpfel -type decide_args -type hammer_args decide decide.c -- -mcpu=v3 -Wall -Werror -I../include -I/usr/include/$(uname -m)-linux-gnu"
