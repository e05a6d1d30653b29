package authority

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func TestValidateAdvertise(t *testing.T) {
	for _, ok := range []string{"127.0.0.1:7946", "192.0.2.10:1", "[2001:db8::1]:65535", "node-1.example.com:7946", "localhost:80"} {
		assert.NoError(t, ValidateAdvertise(ok), ok)
	}
	for _, tc := range []struct{ in, msg string }{
		{"", "not host:port"},
		{"127.0.0.1", "not host:port"},
		{"127.0.0.1:0", "port"},
		{"127.0.0.1:65536", "port"},
		{"127.0.0.1:007", "port"},
		{"127.0.0.1:+7", "port"},
		{"0.0.0.0:7946", "unspecified"},
		{"[::]:7946", "unspecified"},
		{"224.0.0.1:7946", "multicast"},
		{"[fe80::1%eth0]:7946", "zone"},
		{"[::ffff:10.0.0.1]:7946", "::ffff:"},
		{"-bad.example:1", "neither an IP address nor a DNS name"},
		{"a..b:1", "neither"},
		{"1.2.3:1", "neither"},
		{"ex ample:1", "neither"},
		{string(make([]byte, 300)), "at most"},
	} {
		err := ValidateAdvertise(tc.in)
		require.ErrorIs(t, err, ErrAdvertise, tc.in)
		assert.Contains(t, err.Error(), tc.msg, tc.in)
	}
}

func memberIDs(ms []Member) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.ID)
	}
	return out
}

func joinAt(t *testing.T, ta *testAuthority, clock *testClock, name, addr string, zones ...string) (*Joined, RenewParams) {
	t.Helper()
	p := joinParams(t, ta, ta.token(t, TokenSpec{Zones: zones}), name, clock)
	p.Advertise = addr
	p.Region = "eu-west-1"
	j, err := Join(context.Background(), p)
	require.NoError(t, err)
	return j, RenewParams{Addr: ta.addr, Authority: j.Authority, Current: j.Node, Key: p.Key, NewKey: newKey(t), Now: clock.Now}
}

// The second node of a zone learns the first at join; nodes of another zone, revoked nodes,
// expired nodes and nodes that advertised nothing are never named.
func TestJoinAndRenewReturnLiveMembersOfSharedZones(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()

	first, _ := joinAt(t, ta, clock, "n1", "127.0.0.1:7001", "payments")
	assert.Empty(t, first.Members, "the first node has nobody to meet")

	second, rp2 := joinAt(t, ta, clock, "n2", "127.0.0.1:7002", "payments", "research")
	require.Equal(t, []Member{{ID: "spiffe://acme.internal/node/n1", Addr: "127.0.0.1:7001", Zones: []string{"payments"}}}, second.Members)

	other, _ := joinAt(t, ta, clock, "r1", "127.0.0.1:7003", "research")
	require.Equal(t, []Member{{ID: "spiffe://acme.internal/node/n2", Addr: "127.0.0.1:7002", Zones: []string{"research"}}}, other.Members,
		"only the shared zone is named, and n1 (payments only) never")

	silent, _ := joinAt(t, ta, clock, "n4", "", "payments")
	assert.ElementsMatch(t, []string{"spiffe://acme.internal/node/n1", "spiffe://acme.internal/node/n2"}, memberIDs(silent.Members))

	// n2 renews: it is never named to itself, it sees n1, r1 and not n4 (no address).
	renewed, err := Renew(ctx, rp2)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"spiffe://acme.internal/node/n1", "spiffe://acme.internal/node/r1"}, memberIDs(renewed.Members))

	// A revoked node is never named again.
	_, err = ta.RevokeSubject(ctx, "spiffe://acme.internal/node/n1", "compromised")
	require.NoError(t, err)
	late, _ := joinAt(t, ta, clock, "n5", "127.0.0.1:7005", "payments")
	assert.ElementsMatch(t, []string{"spiffe://acme.internal/node/n2"}, memberIDs(late.Members))
}

func TestExpiredMemberIsNeverNamed(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	joinAt(t, ta, clock, "old", "127.0.0.1:7001", "payments")
	clock.Advance(DefaultNodeLifetime + time.Minute)
	j, _ := joinAt(t, ta, clock, "new", "127.0.0.1:7002", "payments")
	assert.Empty(t, j.Members)
}

// A renewal that advertises nothing keeps the recorded address; one that advertises a new address
// replaces it.
func TestRenewKeepsOrReplacesAdvertisedAddress(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	_, rp := joinAt(t, ta, clock, "n1", "127.0.0.1:7001", "payments")
	watcher, _ := joinAt(t, ta, clock, "w", "", "payments")
	require.Equal(t, "127.0.0.1:7001", watcher.Members[0].Addr)

	j, err := Renew(ctx, rp)
	require.NoError(t, err)
	ms, err := ta.Store().MembersFor("w", []string{"payments"}, clock.Now(), MaxMembers)
	require.NoError(t, err)
	require.Len(t, ms, 1)
	assert.Equal(t, "127.0.0.1:7001", ms[0].Addr, "kept across a renewal that advertised nothing")

	rp = RenewParams{Addr: ta.addr, Authority: j.Authority, Current: j.Node, Key: rp.NewKey, NewKey: newKey(t), Now: clock.Now, Advertise: "[2001:db8::7]:7946"}
	_, err = Renew(ctx, rp)
	require.NoError(t, err)
	ms, err = ta.Store().MembersFor("w", []string{"payments"}, clock.Now(), MaxMembers)
	require.NoError(t, err)
	assert.Equal(t, "[2001:db8::7]:7946", ms[0].Addr)
}

func TestMembersAreCappedAndSampled(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	for i := range 12 {
		joinAt(t, ta, clock, "m"+string(rune('a'+i)), "127.0.0.1:"+string(rune('1'+i%9))+"000", "payments")
	}
	seen := map[string]bool{}
	for range 20 {
		ms, err := ta.Store().MembersFor("x", []string{"payments"}, clock.Now(), MaxMembers)
		require.NoError(t, err)
		require.Len(t, ms, MaxMembers)
		for _, m := range ms {
			seen[m.ID] = true
		}
	}
	assert.Greater(t, len(seen), MaxMembers, "the sample varies: not always the first eight")
}

// A malformed advertised address is refused with ErrAdvertise: locally before anything is sent,
// and by the authority when a client skips that check; the token stays unused.
func TestMalformedAdvertiseIsRefused(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
	p := joinParams(t, ta, tok, "n1", clock)
	p.Advertise = "0.0.0.0:7946"
	_, err := Join(ctx, p)
	require.ErrorIs(t, err, ErrAdvertise)
	assert.Contains(t, err.Error(), "unspecified")

	// Bypass the client's check: the authority refuses the request on its own.
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)
	csr, err := createCSR(p.Key, "n1", "", p.HostFingerprint)
	require.NoError(t, err)
	icsr, err := createIssuerCSR(p.Key, "n1", "", p.HostFingerprint)
	require.NoError(t, err)
	_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
		JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: csr, IssuerCSR: icsr, Advertise: "host:99999"})
	require.ErrorIs(t, err, ErrAdvertise)
	assert.Contains(t, err.Error(), "port")

	p.Advertise = "127.0.0.1:7946"
	_, err = Join(ctx, p)
	require.NoError(t, err, "the refused attempts left the token unused")
}
