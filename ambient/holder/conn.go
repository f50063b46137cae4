package holder

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// maxRecvFDs is how many descriptors one read makes room for: more than a
// message may carry, so a peer sending too many is noticed (and every one
// of them closed) rather than silently truncated.
const maxRecvFDs = 4

// send writes one message, with fd attached when fd >= 0.
func send(c *net.UnixConn, m Msg, fd int) error {
	b, err := Encode(m)
	if err != nil {
		return err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("short write: %d/%d bytes, %d/%d control", n, len(b), oobn, len(oob))
	}
	return nil
}

// recv reads one message and the descriptor it carries (-1 if none; the
// caller owns it). A message that is malformed, truncated or carries the
// wrong number of descriptors is an ErrMalformed, and whatever
// descriptors came with it are closed. io.EOF: the peer closed.
func recv(c *net.UnixConn) (Msg, *os.File, error) {
	buf := make([]byte, MaxMsg+1)
	oob := make([]byte, unix.CmsgSpace(4*maxRecvFDs))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return Msg{}, nil, err
	}
	fds, ferr := parseRights(oob[:oobn])
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if n == 0 && len(fds) == 0 {
		return Msg{}, nil, io.EOF
	}
	if ferr != nil {
		closeAll()
		return Msg{}, nil, fmt.Errorf("%w: control message: %v", ErrMalformed, ferr)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMsg {
		closeAll()
		return Msg{}, nil, fmt.Errorf("%w: longer than %d bytes or too many descriptors", ErrMalformed, MaxMsg)
	}
	m, err := Decode(buf[:n])
	if err == nil {
		err = CheckFDs(m, len(fds))
	}
	if err != nil {
		closeAll()
		return Msg{}, nil, err
	}
	if len(fds) == 0 {
		return m, nil, nil
	}
	return m, os.NewFile(uintptr(fds[0]), m.Key.String()), nil
}

// parseRights returns every descriptor in the control messages.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	var errs []error
	for _, cm := range cms {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			errs = append(errs, fmt.Errorf("unexpected control message %d/%d", cm.Header.Level, cm.Header.Type))
			continue
		}
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fds = append(fds, got...)
	}
	return fds, errors.Join(errs...)
}

// isSocket reports whether f is a socket (the holder keeps nothing else).
func isSocket(f *os.File) bool {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFSOCK
}

// dupFD duplicates a descriptor (close-on-exec) into a file named name.
func dupFD(fd uintptr, name string) (*os.File, error) {
	d, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err)
	}
	return os.NewFile(uintptr(d), name), nil
}
