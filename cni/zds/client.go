package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"istio.io/istio/pkg/zdsapi"
)

// Handler receives enrolment events. Each call is acked to the node agent
// with the returned error's text (empty on success).
type Handler interface {
	// Add enrols a pod. netns is the pod's network namespace; the handler
	// owns it from now on (and must close it when the pod goes).
	Add(uid string, info *zdsapi.WorkloadInfo, netns *os.File) error
	// Keep says a pod already enrolled by a previous daemon stays enrolled,
	// but its network namespace is not available to send again.
	Keep(uid string) error
	// Del unenrols a pod.
	Del(uid string) error
	// SnapshotSent ends the initial snapshot: every pod not added or kept
	// since the connection started is gone.
	SnapshotSent() error
}

// Client connects to a node agent and feeds a Handler, reconnecting with
// backoff when the agent restarts.
type Client struct {
	Path    string
	Handler Handler
	Log     *slog.Logger
}

// Run serves the ZDS connection until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	log := c.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "zds", "socket", c.Path)
	backoff := 10 * time.Millisecond
	for {
		start := time.Now()
		err := c.serve(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(start) > 10*time.Second {
			backoff = 10 * time.Millisecond
		}
		log.Warn("node agent connection ended; pods stay enrolled, reconnecting", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (c *Client) serve(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unixpacket", c.Path)
	if err != nil {
		return fmt.Errorf("connecting to the node agent (is istio-cni running on this node?): %w", err)
	}
	uc := conn.(*net.UnixConn)
	defer uc.Close()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer stop()
	if err := writeMsg(uc, &zdsapi.ZdsHello{Version: zdsapi.Version_V1}, nil); err != nil {
		return fmt.Errorf("sending hello: %w", err)
	}
	for {
		var req zdsapi.WorkloadRequest
		// The agent is silent between pod events: no read deadline.
		fd, err := readMsg(uc, &req, time.Time{})
		if err != nil {
			return err
		}
		herr := c.dispatch(&req, fd)
		msg := ""
		if herr != nil {
			msg = herr.Error()
		}
		if err := writeMsg(uc, ack(msg), nil); err != nil {
			return fmt.Errorf("acking: %w", err)
		}
	}
}

func (c *Client) dispatch(req *zdsapi.WorkloadRequest, fd *os.File) error {
	switch p := req.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		if fd == nil {
			return errors.New("add without a network namespace fd")
		}
		if p.Add.GetUid() == "" {
			fd.Close()
			return errors.New("add without a pod uid")
		}
		return c.Handler.Add(p.Add.GetUid(), p.Add.GetWorkloadInfo(), fd)
	}
	if fd != nil {
		fd.Close() // only an add carries a namespace
	}
	switch p := req.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Keep:
		return c.Handler.Keep(p.Keep.GetUid())
	case *zdsapi.WorkloadRequest_Del:
		return c.Handler.Del(p.Del.GetUid())
	case *zdsapi.WorkloadRequest_SnapshotSent:
		return c.Handler.SnapshotSent()
	}
	return fmt.Errorf("unknown ZDS request %T", req.GetPayload())
}
