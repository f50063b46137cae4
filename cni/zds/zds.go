// Package zds speaks Istio's ztunnel discovery service (ZDS): the protocol
// over which a node agent (istio-cni, or kmesh-cni) hands the node proxy
// each pod's network namespace. Both ends live here: the Client the daemon
// runs, and the Server the simulator (and kmesh-cni) runs.
//
// Wire format, as Istio's node agent implements it: a unix SOCK_SEQPACKET
// socket, one protobuf per packet. The proxy connects and sends ZdsHello;
// the agent sends WorkloadRequests one at a time (an add carries exactly
// one network namespace fd in SCM_RIGHTS) and waits for a WorkloadResponse
// ack after each; after the initial snapshot it sends snapshot_sent.
package zds

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// DefaultSocket is where istio-cni's node agent listens.
const DefaultSocket = "/var/run/ztunnel/ztunnel.sock"

// maxMessage bounds one ZDS packet; Istio's agent reads into 1 KiB.
const maxMessage = 1024

const ioTimeout = 5 * time.Second

// readMsg reads one packet and, when present, the one fd it carries.
func readMsg(c *net.UnixConn, m proto.Message, deadline time.Time) (*os.File, error) {
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4))
	if err := c.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	var fd *os.File
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, fmt.Errorf("ZDS control message: %w", err)
		}
		for _, cm := range cmsgs {
			fds, err := unix.ParseUnixRights(&cm)
			if err != nil {
				continue
			}
			for i, f := range fds {
				if i == 0 && fd == nil {
					fd = os.NewFile(uintptr(f), "netns")
				} else {
					unix.Close(f) // the protocol carries exactly one
				}
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		if fd != nil {
			fd.Close()
		}
		return nil, errors.New("ZDS message truncated")
	}
	if n == 0 {
		if fd != nil {
			fd.Close()
		}
		return nil, errEOF
	}
	if err := proto.Unmarshal(buf[:n], m); err != nil {
		if fd != nil {
			fd.Close()
		}
		return nil, fmt.Errorf("decoding ZDS message: %w", err)
	}
	return fd, nil
}

var errEOF = errors.New("ZDS peer closed the connection")

func writeMsg(c *net.UnixConn, m proto.Message, fd *os.File) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	if err := c.SetWriteDeadline(time.Now().Add(ioTimeout)); err != nil {
		return err
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

func ack(errMsg string) *zdsapi.WorkloadResponse {
	return &zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: errMsg}}}
}

func dupCloexec(fd int) (int, error) { return unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0) }
