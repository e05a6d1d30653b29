package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"
)

// FuzzHandler drives the whole handler (caller check, routing, decoding, validation) with
// arbitrary methods, paths, queries and bodies: it must never panic, always answer JSON with a
// known code on error, and never pass the Backend a value the validation should have refused.
func FuzzHandler(f *testing.F) {
	f.Add("POST", PathRevocations, "", []byte(`{"subject":"serial:1","reason":"r"}`), true)
	f.Add("POST", PathAgents, "", []byte(`{"name":"a","zone":"z","exe":"/bin/a","uid":7}`), true)
	f.Add("GET", PathWhoIs, "addr=100.100.1.1:43512", []byte(nil), true)
	f.Add("GET", PathAudit, "recent=3", []byte(nil), true)
	f.Add("DELETE", PathAgents+"/z/a", "", []byte(nil), true)
	f.Add("GET", PathStatus, "", []byte(nil), false)
	f.Add("POST", PathRevocations, "", []byte(`{"subject":"\u0000","reason":1}`), true)
	f.Fuzz(func(t *testing.T, method, path, query string, body []byte, allowed bool) {
		fb := &fakeBackend{}
		s := &Server{b: fb, log: slog.New(slog.DiscardHandler)}
		h := s.handler(time.Second)
		u := &url.URL{Scheme: "http", Host: "ute", Path: path, RawQuery: query}
		req, err := http.NewRequest(method, u.String(), bytes.NewReader(body))
		if err != nil {
			return // not a request net/http would ever hand the handler
		}
		req = req.WithContext(context.WithValue(req.Context(), callerKey{}, Caller{Allowed: allowed}))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if !allowed {
			if rec.Code != http.StatusForbidden || fb.calls.Load() != 0 {
				t.Fatalf("unchecked caller got %d with %d backend calls", rec.Code, fb.calls.Load())
			}
			return
		}
		if rec.Code == http.StatusOK {
			return
		}
		var we wireError
		if err := json.Unmarshal(rec.Body.Bytes(), &we); err != nil || we.Error == "" {
			t.Fatalf("error response is not a JSON error: %d %q", rec.Code, rec.Body.String())
		}
		if (&RemoteError{Code: we.Code}).Unwrap() == ErrInternal && we.Code != CodeInternal {
			t.Fatalf("unknown code %q", we.Code)
		}
		if we.Code == CodeBadRequest && fb.calls.Load() != 0 {
			t.Fatalf("a request refused as bad reached the Backend")
		}
	})
}
