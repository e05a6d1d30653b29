package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzLoad: any bytes either load completely or give a one-line *ParseError wrapping a
// sentinel, quickly and without a panic; what loads passes the same checks again.
func FuzzLoad(f *testing.F) {
	for _, s := range []string{
		full, "", "listen: 127.0.0.1:0\n", "peers: [{node: b, addr: 1.2.3.4:5}]\n",
		"log: &a {level: info}\nx: *a\n", "peers: [[[[[[[[]]]]]]]]\n", "- - - - x\n",
		"metrics: 0.0.0.0:1\n", "gossip: {retransmit_mult: 1e9}\n", "? a\n: b\n", "{a: [b, {c: d}]}\n",
		"listen: \"\\u0000\"\n", "renewal: {min_retry: 1s, max_retry: 2s}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		start := time.Now()
		c, err := Parse("f.yaml", data)
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("parse took %s for %d bytes", d, len(data))
		}
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("not a *ParseError: %T %v", err, err)
			}
			known := false
			for _, s := range []error{ErrTooLarge, ErrTooDeep, ErrSyntax, ErrUnsupported, ErrUnknownField, ErrBadValue, ErrNotLoopback} {
				known = known || errors.Is(err, s)
			}
			if !known {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error: %q", err.Error())
			}
			return
		}
		if c.Metrics.IsValid() && !c.Metrics.Addr().IsLoopback() {
			t.Fatalf("non-loopback metrics accepted: %v", c.Metrics)
		}
		if c.Renewal.MinRetry > c.Renewal.MaxRetry || c.Gossip.RetransmitMult < 1 || c.Gossip.Interval <= 0 {
			t.Fatalf("out-of-range values accepted: %+v", c)
		}
	})
}
