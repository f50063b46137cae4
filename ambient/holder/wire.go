// Package holder keeps the node proxy's in-pod listening sockets alive
// while no daemon runs. A crashing daemon takes its sockets with it: the
// kernel then refuses every new connection to a pod's 15001/15006/15008
// until the next daemon binds again. The holder is a small long-lived
// process with no mesh logic that keeps a duplicate of every listening
// socket the daemon opened; while it has them the sockets stay open, new
// connections wait in their accept queues, and the next daemon takes the
// same sockets back and accepts them.
//
// The daemon talks to the holder over a Unix SOCK_SEQPACKET socket, one
// message a datagram, file descriptors passed with SCM_RIGHTS:
//
//	put(key) + fd     hold fd under key (replacing what key held)
//	drop(key)         stop holding key
//	droppod(pod)      stop holding every key of a pod
//	list              the holder answers entry(key)+fd for each held
//	                  socket (it keeps holding them), then done
//
// Every request is answered with ok, or err with a reason. A key names a
// socket generically — pod, network namespace cookie, listener name such
// as "15001/v4" or "15053/udp" — so TCP and UDP sockets alike fit.
//
// wire.go is the message format (pure); server.go the holder; keeper.go
// the daemon's side.
package holder

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Op is a message's operation.
type Op uint8

const (
	OpPut     Op = 1 // client: hold the attached fd under Key
	OpDrop    Op = 2 // client: forget Key
	OpDropPod Op = 3 // client: forget every key of Key.Pod
	OpList    Op = 4 // client: send every held socket back
	OpEntry   Op = 5 // holder: one held socket (Key + fd), an answer to list
	OpOK      Op = 6 // holder: the request was done
	OpErr     Op = 7 // holder: the request was refused (Text says why)
)

func (o Op) String() string {
	switch o {
	case OpPut:
		return "put"
	case OpDrop:
		return "drop"
	case OpDropPod:
		return "droppod"
	case OpList:
		return "list"
	case OpEntry:
		return "entry"
	case OpOK:
		return "ok"
	case OpErr:
		return "err"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// fdOps carry exactly one file descriptor; every other op carries none.
func (o Op) carriesFD() bool { return o == OpPut || o == OpEntry }

// Key names one held socket.
type Key struct {
	// Pod is the enrolment's id (the ZDS uid).
	Pod string
	// Netns is the cookie of the pod's network namespace the socket lives
	// in: a pod whose sandbox was recreated has a new one, and its old
	// sockets are not taken for the new namespace.
	Netns uint64
	// Name says which socket of the pod: "15001/v4", "15008", "15053/udp".
	Name string
}

func (k Key) String() string { return fmt.Sprintf("%s/%d/%s", k.Pod, k.Netns, k.Name) }

// Msg is one message either way.
type Msg struct {
	Op  Op
	Key Key
	// Text is the reason of an OpErr.
	Text string
}

// Bounds of the format. A message never exceeds MaxMsg bytes, so the
// holder reads each into a fixed buffer and a longer one is truncated,
// noticed and refused.
const (
	version    = 1
	MaxPod     = 253 // a Kubernetes UID is 36; ZDS uids are names at most
	MaxName    = 64
	MaxText    = 256
	headerSize = 2 + 8 + 1 + 1 + 2 // version, op, netns, pod len, name len, text len
	MaxMsg     = headerSize + MaxPod + MaxName + MaxText
)

// ErrMalformed wraps every decoding failure.
var ErrMalformed = errors.New("malformed holder message")

// Encode lays out m: version, op, netns (little endian), the lengths of
// pod, name and text, then their bytes.
func Encode(m Msg) ([]byte, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	b := make([]byte, headerSize, headerSize+len(m.Key.Pod)+len(m.Key.Name)+len(m.Text))
	b[0], b[1] = version, byte(m.Op)
	binary.LittleEndian.PutUint64(b[2:10], m.Key.Netns)
	b[10], b[11] = byte(len(m.Key.Pod)), byte(len(m.Key.Name))
	binary.LittleEndian.PutUint16(b[12:14], uint16(len(m.Text)))
	b = append(b, m.Key.Pod...)
	b = append(b, m.Key.Name...)
	return append(b, m.Text...), nil
}

// Decode parses one message. Whether the right number of descriptors came
// with it is the caller's check (CheckFDs): they travel beside the bytes.
func Decode(b []byte) (Msg, error) {
	if len(b) < headerSize {
		return Msg{}, fmt.Errorf("%w: %d bytes, want at least %d", ErrMalformed, len(b), headerSize)
	}
	if b[0] != version {
		return Msg{}, fmt.Errorf("%w: version %d, want %d", ErrMalformed, b[0], version)
	}
	pl, nl, tl := int(b[10]), int(b[11]), int(binary.LittleEndian.Uint16(b[12:14]))
	if len(b) != headerSize+pl+nl+tl {
		return Msg{}, fmt.Errorf("%w: %d bytes, the lengths say %d", ErrMalformed, len(b), headerSize+pl+nl+tl)
	}
	rest := b[headerSize:]
	m := Msg{Op: Op(b[1]), Key: Key{Netns: binary.LittleEndian.Uint64(b[2:10]),
		Pod: string(rest[:pl]), Name: string(rest[pl : pl+nl])}, Text: string(rest[pl+nl:])}
	if err := m.validate(); err != nil {
		return Msg{}, err
	}
	return m, nil
}

// CheckFDs says whether n descriptors is what m must carry.
func CheckFDs(m Msg, n int) error {
	want := 0
	if m.Op.carriesFD() {
		want = 1
	}
	if n != want {
		return fmt.Errorf("%w: %s with %d file descriptors, want %d", ErrMalformed, m.Op, n, want)
	}
	return nil
}

// validate checks which fields each op needs and that names are short
// printable ASCII (they end up in logs).
func (m Msg) validate() error {
	bad := func(f string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrMalformed, m.Op, fmt.Sprintf(f, a...))
	}
	if len(m.Key.Pod) > MaxPod || len(m.Key.Name) > MaxName || len(m.Text) > MaxText {
		return bad("field too long")
	}
	if !printable(m.Key.Pod) || !printable(m.Key.Name) || !printable(m.Text) {
		return bad("non-printable bytes")
	}
	switch m.Op {
	case OpPut, OpDrop, OpEntry:
		if m.Key.Pod == "" || m.Key.Name == "" || m.Key.Netns == 0 {
			return bad("needs pod, netns and name")
		}
	case OpDropPod:
		if m.Key.Pod == "" || m.Key.Name != "" || m.Key.Netns != 0 {
			return bad("needs a pod only")
		}
	case OpList, OpOK, OpErr:
		if m.Key != (Key{}) {
			return bad("takes no key")
		}
	default:
		return bad("unknown op")
	}
	if m.Text != "" && m.Op != OpErr {
		return bad("only err has text")
	}
	return nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
