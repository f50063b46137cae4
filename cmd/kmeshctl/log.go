package main

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// defaultAdminAddr is the daemon's admin port, as ztunnel's (localhost
// only: kmeshctl runs on the node, or in the daemon's pod).
const defaultAdminAddr = "localhost:15000"

func logCmd() *cobra.Command {
	var admin string
	var reset bool
	c := &cobra.Command{
		Use:   "log [LEVEL]",
		Short: "Show or change the daemon's log level (error, warn, info, debug, trace, off)",
		Long: `Show or change the running daemon's log level through its admin port's /logging,
as istioctl ztunnel-config log does with ztunnel. Without LEVEL it prints the
level; --reset restores the configured one (LOG_LEVEL). The change lasts until
the daemon restarts.`,
		Args:      cobra.MaximumNArgs(1),
		ValidArgs: []cobra.Completion{"error", "warn", "info", "debug", "trace", "off"},
		RunE: func(c *cobra.Command, args []string) error {
			level := ""
			if len(args) == 1 {
				level = args[0]
			}
			if reset && level != "" {
				return usageError{fmt.Errorf("a LEVEL and --reset together: pick one")}
			}
			msg, err := postLogging(admin, loggingQuery(level, reset))
			if err != nil {
				return err
			}
			fmt.Fprint(c.OutOrStdout(), msg)
			return nil
		},
	}
	addr := os.Getenv("KMESH_ADMIN_ADDR")
	if addr == "" {
		addr = defaultAdminAddr
	}
	c.Flags().StringVar(&admin, "admin-addr", addr, "the daemon's admin address (KMESH_ADMIN_ADDR)")
	c.Flags().BoolVarP(&reset, "reset", "r", false, "restore the configured level")
	return c
}

// loggingQuery is ztunnel's /logging query for a level or a reset (none:
// list the level).
func loggingQuery(level string, reset bool) url.Values {
	q := url.Values{}
	if level != "" {
		q.Set("level", level)
	}
	if reset {
		q.Set("reset", "")
	}
	return q
}

// postLogging asks the daemon at addr; a refusal comes back with the
// daemon's own reason (an unknown level lists the known ones).
func postLogging(addr string, q url.Values) (string, error) {
	code, body, err := post(addr, "/logging?"+q.Encode(), 10*time.Second)
	if err != nil {
		return "", fmt.Errorf("%w (is kmesh-daemon running on this node, with its admin server on %s? --admin-addr)", err, addr)
	}
	if code != 200 {
		return "", fmt.Errorf("the daemon at %s refused (%d): %s", addr, code, strings.TrimSpace(body))
	}
	return body, nil
}

// post is an HTTP/1.0 POST without a body to the daemon's admin port. Not
// net/http: its client (with TLS, HTTP/2, proxies) would double
// kmeshctl's size (+4.9 MB) for one request to localhost. HTTP/1.0 keeps
// the answer simple: no chunking, the body ends when the server closes.
func post(addr, path string, timeout time.Duration) (code int, body string, err error) {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return 0, "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.0\r\nHost: %s\r\nContent-Length: 0\r\n\r\n", path, addr); err != nil {
		return 0, "", err
	}
	raw, err := io.ReadAll(io.LimitReader(conn, 1<<20))
	if err != nil {
		return 0, "", err
	}
	return parseResponse(string(raw))
}

// parseResponse splits an HTTP/1.x response into its status code and body.
func parseResponse(raw string) (int, string, error) {
	head, body, ok := strings.Cut(raw, "\r\n\r\n")
	if !ok {
		return 0, "", fmt.Errorf("truncated HTTP response %q", raw)
	}
	status, _, _ := strings.Cut(head, "\r\n")
	proto, rest, _ := strings.Cut(status, " ")
	codeText, _, _ := strings.Cut(rest, " ")
	code, err := strconv.Atoi(codeText)
	if !strings.HasPrefix(proto, "HTTP/1.") || err != nil || code < 100 || code > 999 {
		return 0, "", fmt.Errorf("not an HTTP response: %q", status)
	}
	return code, body, nil
}
