package metrics

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer func() { _ = resp.Body.Close() }()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

func serve(t *testing.T, m *Metrics) string {
	t.Helper()
	s, err := m.Listen("127.0.0.1:0", nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return s.Addr().String()
}

func TestScrape(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	m := New(WithClock(func() time.Time { return now }))
	addr := serve(t, m)

	m.SetTunnels("payments", 3)
	m.SetTunnels("support", 1)
	m.FlowAdmitted("payments")
	m.FlowAdmitted("payments")
	m.FlowDenied("replay")
	m.FlowDenied("zone")
	m.FlowDenied("zone")
	m.SetRevocationsHeld(7)
	m.RevocationArrived(30 * time.Millisecond)
	m.RevocationArrived(2 * time.Second)
	m.RevocationArrived(-time.Second) // issuer's clock ahead: counted as 0
	m.SetGossipMembers("payments", 20)
	m.GossipDropped("signature")
	m.SetCertificateExpiry(now.Add(12 * time.Hour))
	m.RenewalFailed(now.Add(-time.Minute))

	out := scrape(t, addr)
	for _, want := range []string{
		`ute_tunnels{zone="payments"} 3`,
		`ute_tunnels{zone="support"} 1`,
		`ute_flows_admitted_total{zone="payments"} 2`,
		`ute_flows_denied_total{reason="replay"} 1`,
		`ute_flows_denied_total{reason="zone"} 2`,
		`ute_revocations_held 7`,
		`ute_revocation_age_seconds_bucket{le="0.01"} 1`,
		`ute_revocation_age_seconds_bucket{le="0.05"} 2`,
		`ute_revocation_age_seconds_bucket{le="2.5"} 3`,
		`ute_revocation_age_seconds_count 3`,
		`ute_gossip_members{zone="payments"} 20`,
		`ute_gossip_records_dropped_total{reason="signature"} 1`,
		`ute_node_certificate_expiry_seconds 43200`,
		`ute_node_certificate_expiry_timestamp_seconds 1.8000432e+09`,
		`ute_renewal_failures_total 1`,
		`ute_renewal_last_failure_timestamp_seconds 1.79999994e+09`,
	} {
		assert.True(t, strings.Contains(out, want+"\n"), "missing %q", want)
	}
	for _, want := range []string{"\ngo_goroutines ", "\nprocess_resident_memory_bytes "} {
		assert.True(t, strings.Contains(out, want), "missing %q", want)
	}

	now = now.Add(time.Hour)
	m.Renewed(now.Add(24 * time.Hour))
	m.ForgetZone("support")
	out = scrape(t, addr)
	assert.True(t, strings.Contains(out, "ute_node_certificate_expiry_seconds 86400\n"))
	assert.True(t, strings.Contains(out, "ute_renewals_total 1\n"))
	assert.False(t, strings.Contains(out, `zone="support"`))
}

// Two Metrics never share series: no global registry.
func TestRegistriesAreSeparate(t *testing.T) {
	a, b := New(), New()
	a.SetRevocationsHeld(5)
	addr := serve(t, b)
	assert.True(t, strings.Contains(scrape(t, addr), "ute_revocations_held 0\n"))
}

func TestListenRefusesNonLoopback(t *testing.T) {
	m := New()
	for _, addr := range []string{"0.0.0.0:0", "[::]:0", "192.0.2.1:9464", "localhost:0", ":9464", "nonsense"} {
		_, err := m.Listen(addr, nil)
		require.ErrorIs(t, err, ErrNotLoopback, addr)
	}
	err := m.Serve(context.Background(), "0.0.0.0:0", nil)
	require.ErrorIs(t, err, ErrNotLoopback)

	s, err := m.Listen("[::1]:0", nil)
	if err != nil {
		t.Logf("no IPv6 loopback here: %v", err)
	} else {
		require.NoError(t, s.Close())
	}
}

// Serve returns once ctx is cancelled and the port is released.
func TestServeStopsWithContext(t *testing.T) {
	m := New()
	s, err := m.Listen("127.0.0.1:0", nil)
	require.NoError(t, err)
	addr := s.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	scrape(t, addr)
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	_, err = net.DialTimeout("tcp", addr, time.Second)
	require.Error(t, err, "the listener is closed")

	// Only GET /metrics is served.
	m2 := New()
	addr2 := serve(t, m2)
	resp, err := http.Post("http://"+addr2+"/metrics", "text/plain", strings.NewReader("x"))
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	resp, err = http.Get("http://" + addr2 + "/")
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
}
