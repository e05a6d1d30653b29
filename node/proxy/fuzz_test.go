package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"strings"
	"testing"
)

func FuzzSOCKS5Request(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 15, 'l', 'e', 'd', 'g', 'e', 'r', '.', 'p', 'a', 'y', 'm', 'e', 'n', 't', 's', 0x1f, 0x90})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 100, 100, 1, 17, 0x1f, 0x90})
	f.Add([]byte{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{5, 2, 1, 2})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1, 0, 80})
	f.Add([]byte{4, 1, 0, 80})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		if err := ReadSOCKSGreeting(r); err != nil {
			if !errors.Is(err, ErrSOCKS) && !errors.Is(err, ErrSOCKSNoAuth) {
				t.Fatalf("greeting error wraps no sentinel: %v", err)
			}
			return
		}
		req, err := ReadSOCKSRequest(r)
		if err != nil {
			if !errors.Is(err, ErrSOCKS) && !errors.Is(err, ErrSOCKSCommand) {
				t.Fatalf("request error wraps no sentinel: %v", err)
			}
			return
		}
		if req.Cmd != CmdConnect || req.Port == 0 || req.Host == "" || strings.ContainsAny(req.Host, " /") {
			t.Fatalf("accepted a bad request %+v", req)
		}
	})
}

func FuzzHTTPConnect(f *testing.F) {
	f.Add("CONNECT ledger.payments:8080 HTTP/1.1\r\nHost: ledger.payments:8080\r\n\r\n")
	f.Add("GET http://ledger.payments:8080/x?y=1 HTTP/1.1\r\nHost: ledger.payments:8080\r\nProxy-Connection: keep-alive\r\n\r\n")
	f.Add("CONNECT 100.100.1.17:443 HTTP/1.0\r\n\r\n")
	f.Add("CONNECT [::1]:0 HTTP/1.1\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	f.Add("GET https://a.b/ HTTP/1.1\r\n\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		req, err := ReadHTTPProxyRequest(bufio.NewReader(strings.NewReader(s)))
		if err != nil {
			if !errors.Is(err, ErrHTTPProxy) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		if req.Target == "" || (!req.Tunnel && req.Req == nil) {
			t.Fatalf("accepted a request with no target: %+v", req)
		}
	})
}
