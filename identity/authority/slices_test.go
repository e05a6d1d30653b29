package authority

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
)

func req(zone, cidr string, bits int) SliceRequest {
	return SliceRequest{Zone: zone, CIDR: netip.MustParsePrefix(cidr), Bits: bits}
}

func allocate(t *testing.T, s *Store, node string, reqs ...SliceRequest) ([]SliceRecord, error) {
	t.Helper()
	var out []SliceRecord
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, r := range reqs {
			rec, err := allocateSlice(tx, r, node, 1, time.Unix(10, 0))
			if err != nil {
				return err
			}
			out = append(out, rec)
		}
		return nil
	})
	return out, err
}

func prefixes(t *testing.T, recs []SliceRecord) []string {
	t.Helper()
	out := make([]string, len(recs))
	for i, r := range recs {
		p, err := r.Slice()
		require.NoError(t, err)
		out[i] = p.String()
	}
	return out
}

func TestAllocateSliceLowestFreeAndDisjoint(t *testing.T) {
	tests := []struct {
		name  string
		first []SliceRequest // allocated to node "a" first
		next  SliceRequest   // then to node "b"
		want  string
	}{
		{"second /28 of a /24", []SliceRequest{req("z", "100.100.1.0/24", 28)}, req("z", "100.100.1.0/24", 28), "100.100.1.16/28"},
		{"smaller slice after a larger one", []SliceRequest{req("z", "10.0.0.0/16", 24)}, req("z", "10.0.0.0/16", 28), "10.0.1.0/28"},
		{"larger slice skips a smaller one", []SliceRequest{req("z", "10.0.0.0/16", 28)}, req("z", "10.0.0.0/16", 24), "10.0.1.0/24"},
		{"ipv6", []SliceRequest{req("z", "fd00:1::/64", 72)}, req("z", "fd00:1::/64", 72), "fd00:1:0:0:100::/72"},
		{"slice left by a CIDR moved between zones", []SliceRequest{req("old", "10.0.0.0/24", 28)}, req("new", "10.0.0.0/24", 28), "10.0.0.16/28"},
		{"families do not interfere", []SliceRequest{req("z", "10.0.0.0/24", 28)}, req("z", "::/64", 72), "::/72"},
		{"top of the address space", []SliceRequest{req("z", "255.255.255.0/24", 28)}, req("z", "255.255.255.0/24", 28), "255.255.255.16/28"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTestStore(t)
			_, err := allocate(t, s, "a", tc.first...)
			require.NoError(t, err)
			got, err := allocate(t, s, "b", tc.next)
			require.NoError(t, err)
			assert.Equal(t, []string{tc.want}, prefixes(t, got))
			assertDisjoint(t, s)
		})
	}
}

// assertDisjoint checks the invariant the whole feature rests on: no two stored slices overlap.
func assertDisjoint(t *testing.T, s *Store) {
	t.Helper()
	all, err := s.Slices()
	require.NoError(t, err)
	for i := range all {
		for j := range i {
			pi, err := all[i].Slice()
			require.NoError(t, err)
			pj, err := all[j].Slice()
			require.NoError(t, err)
			require.False(t, pi.Overlaps(pj), "%s (%s) overlaps %s (%s)", pi, all[i].Node, pj, all[j].Node)
		}
	}
}

func TestAllocateSliceExhaustion(t *testing.T) {
	s, _ := openTestStore(t)
	var got []string
	for i := range 4 {
		recs, err := allocate(t, s, fmt.Sprintf("n%d", i), req("z", "10.0.0.0/28", 30))
		require.NoError(t, err)
		got = append(got, prefixes(t, recs)...)
	}
	assert.Equal(t, []string{"10.0.0.0/30", "10.0.0.4/30", "10.0.0.8/30", "10.0.0.12/30"}, got)
	_, err := allocate(t, s, "n4", req("z", "10.0.0.0/28", 30))
	require.ErrorIs(t, err, ErrZoneFull)
	assert.Contains(t, err.Error(), "zone z CIDR 10.0.0.0/28 has no free /30 slice left")

	// The top of the IPv4 space: the jump past the last slice must not wrap around to 0.0.0.0.
	for range 2 {
		_, err = allocate(t, s, "top", req("t", "255.255.255.252/30", 31))
		require.NoError(t, err)
	}
	_, err = allocate(t, s, "top", req("t", "255.255.255.252/30", 31))
	require.ErrorIs(t, err, ErrZoneFull)
	assertDisjoint(t, s)
}

func TestAllocateSliceRefusesBadLength(t *testing.T) {
	s, _ := openTestStore(t)
	for _, r := range []SliceRequest{req("z", "10.0.0.0/24", 24), req("z", "10.0.0.0/24", 33), req("z", "fd00::/64", 129)} {
		_, err := allocate(t, s, "a", r)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "does not fit CIDR")
	}
}

func TestConsumeAllocatesSlicesAtomically(t *testing.T) {
	s, path := openTestStore(t)
	now := time.Unix(5000, 0)
	putToken(t, s, "t1", "s1", now.Add(time.Hour))
	putToken(t, s, "t2", "s2", now.Add(time.Hour))
	putToken(t, s, "t3", "s3", now.Add(time.Hour))
	want := func(TokenRecord) ([]SliceRequest, error) {
		return []SliceRequest{req("z", "10.0.0.0/29", 30), req("z", "fd00::/126", 127)}, nil
	}
	c1, err := s.Consume(ConsumeRequest{ID: "t1", SecretHash: hashOf("s1"), Consumer: "n1", Now: now, Check: want})
	require.NoError(t, err)
	assert.Equal(t, []string{"10.0.0.0/30", "fd00::/127"}, prefixes(t, c1.Slices))
	assert.Equal(t, c1.Serial, c1.Slices[0].Serial)
	assert.Equal(t, "n1", c1.Slices[1].Node)

	// The IPv6 CIDR still has room but the IPv4 one does not after n2: n3 is refused as a whole.
	_, err = s.Consume(ConsumeRequest{ID: "t2", SecretHash: hashOf("s2"), Consumer: "n2", Now: now, Check: want})
	require.NoError(t, err)
	before, err := s.Slices()
	require.NoError(t, err)
	metaBefore, err := s.Meta()
	require.NoError(t, err)
	_, err = s.Consume(ConsumeRequest{ID: "t3", SecretHash: hashOf("s3"), Consumer: "n3", Now: now, Check: want})
	require.ErrorIs(t, err, ErrZoneFull)
	tok, err := s.Token("t3")
	require.NoError(t, err)
	assert.Empty(t, tok.ConsumedBy, "a full zone must not consume the token")
	after, err := s.Slices()
	require.NoError(t, err)
	assert.Equal(t, before, after, "no slice of the refused join was kept")
	metaAfter, err := s.Meta()
	require.NoError(t, err)
	assert.Equal(t, metaBefore.LastSerial, metaAfter.LastSerial, "no serial was spent")
	n3, err := s.NodeSlices("n3")
	require.NoError(t, err)
	assert.Empty(t, n3)

	// Crash safety: a fresh handle on the file sees exactly the committed slices, and allocation
	// continues past them.
	require.NoError(t, s.Close())
	s2, err := OpenStore(path, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close() })
	reopened, err := s2.Slices()
	require.NoError(t, err)
	assert.Equal(t, before, reopened)
	n1, err := s2.NodeSlices("n1")
	require.NoError(t, err)
	assert.Equal(t, prefixes(t, c1.Slices), prefixes(t, n1))
	got, err := allocate(t, s2, "n4", req("z", "fd00::/126", 127))
	require.ErrorIs(t, err, ErrZoneFull, "fd00::/127 and fd00::2/127 went to n1 and n2: %v", got)
	assertDisjoint(t, s2)
}

func TestConsumeConcurrentJoinsGetDisjointSlices(t *testing.T) {
	s, _ := openTestStore(t)
	now := time.Unix(5000, 0)
	const n = 16
	for i := range n {
		putToken(t, s, fmt.Sprint("t", i), "s", now.Add(time.Hour))
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			_, errs[i] = s.Consume(ConsumeRequest{ID: fmt.Sprint("t", i), SecretHash: hashOf("s"), Consumer: fmt.Sprint("n", i), Now: now,
				Check: func(TokenRecord) ([]SliceRequest, error) { return []SliceRequest{req("z", "10.0.0.0/24", 28)}, nil }})
		})
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	all, err := s.Slices()
	require.NoError(t, err)
	assert.Len(t, all, n)
	assertDisjoint(t, s)
	_, err = s.Consume(ConsumeRequest{ID: "t0", SecretHash: hashOf("s"), Consumer: "late", Now: now})
	require.ErrorIs(t, err, ErrTokenUsed)
}

func grantOf(t *testing.T, c *identity.Certificate, zone string) []netip.Prefix {
	t.Helper()
	g, ok := c.Claims.Zone(zone)
	require.True(t, ok, "%s holds no %s grant", c.ID, zone)
	return g.Prefixes
}

func TestJoinGivesEachNodeItsOwnSlice(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()
	var certs []*identity.Certificate
	for _, name := range []string{"n1", "n2", "n3"} {
		j, err := Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments", "research"}, Regions: []string{"eu-west-1"}}), name, clock))
		require.NoError(t, err)
		certs = append(certs, j.Node)
	}
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.16/28")}, grantOf(t, certs[1], "payments"))
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.2.32/28")}, grantOf(t, certs[2], "research"))
	for i := range certs {
		recs, err := ta.Store().NodeSlices(certs[i].ID.Name)
		require.NoError(t, err)
		assert.Equal(t, []string{grantOf(t, certs[i], "payments")[0].String(), grantOf(t, certs[i], "research")[0].String()}, prefixes(t, recs))
		for j := range i {
			for _, z := range []string{"payments", "research"} {
				assert.False(t, grantOf(t, certs[i], z)[0].Overlaps(grantOf(t, certs[j], z)[0]))
			}
		}
	}
	assertDisjoint(t, ta.Store())
}

const tinyPolicy = `zones:
  - name: tiny
    cidr: 10.9.0.0/28
    node_prefix: 29
    regions: [eu-west-1]
    min_trust: 0
    isolate_below: 0
`

func TestJoinRefusedWhenZoneFullLeavesTokenUnused(t *testing.T) {
	clock := newTestClock()
	ta := startAuthorityWith(t, clock, tinyPolicy)
	ctx := context.Background()
	for _, name := range []string{"a", "b"} {
		_, err := Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"tiny"}}), name, clock))
		require.NoError(t, err)
	}
	tok := ta.token(t, TokenSpec{Zones: []string{"tiny"}})
	metaBefore, err := ta.Store().Meta()
	require.NoError(t, err)
	_, err = Join(ctx, joinParams(t, ta, tok, "c", clock))
	require.ErrorIs(t, err, ErrZoneFull, "the refusal crosses the wire with its sentinel")
	assert.Contains(t, err.Error(), "zone tiny CIDR 10.9.0.0/28 has no free /29 slice left")
	rec := lastAudit(t, ta)
	assert.Equal(t, OutcomeRefused, rec.Outcome)
	assert.Equal(t, CodeZoneFull, rec.WireCode)

	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)
	stored, err := ta.Store().Token(parsed.ID)
	require.NoError(t, err)
	assert.Empty(t, stored.ConsumedBy, "the token is still good")
	metaAfter, err := ta.Store().Meta()
	require.NoError(t, err)
	assert.Equal(t, metaBefore.LastSerial, metaAfter.LastSerial)
	issued, err := ta.Store().Issued()
	require.NoError(t, err)
	assert.Len(t, issued, 2)
}

// Slices survive an authority restart and are never handed out again, even to a node that rejoins
// under the same name.
func TestSlicesSurviveRestartAndAreNeverReissued(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	ctx := context.Background()
	j1, err := Join(ctx, joinParams(t, ta, ta.token(t, TokenSpec{Zones: []string{"payments"}}), "n1", clock))
	require.NoError(t, err)
	pending := ta.token(t, TokenSpec{Zones: []string{"payments"}})
	require.NoError(t, ta.Revoke(j1.Node.Serial().Uint64(), "decommissioned"))
	stop()

	ta2, _ := serveAuthority(t, dir, clock)
	n1, err := ta2.Store().NodeSlices("n1")
	require.NoError(t, err)
	assert.Equal(t, []string{"100.100.1.0/28"}, prefixes(t, n1), "n1's slice is remembered after the restart")
	_, err = ta2.ReleaseName(ctx, "n1", "rebuilt")
	require.NoError(t, err, "a revoked name is reopened by the operator")
	j2, err := Join(ctx, joinParams(t, ta2, pending, "n1", clock))
	require.NoError(t, err, "a token created before the restart still works")
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.16/28")}, grantOf(t, j2.Node, "payments"),
		"a rejoin under the same name, after revocation, still gets a fresh slice")
	n1, err = ta2.Store().NodeSlices("n1")
	require.NoError(t, err)
	assert.Equal(t, []string{"100.100.1.0/28", "100.100.1.16/28"}, prefixes(t, n1))
	assertDisjoint(t, ta2.Store())
}

func TestRenewKeepsTheNodesSlice(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	_, _ = joinNode(t, ta, clock, "n0") // takes the first slice, so n1's is not the zone's first
	j, rp := joinNode(t, ta, clock, "n1")
	want := grantOf(t, j.Node, "payments")
	require.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.16/28")}, want)

	for range 2 {
		clock.Advance(13 * time.Hour)
		r, err := Renew(context.Background(), rp)
		require.NoError(t, err)
		assert.Equal(t, want, grantOf(t, r.Node, "payments"))
		rp.Current, rp.Key, rp.NewKey = r.Node, rp.NewKey, newKey(t)
	}
	recs, err := ta.Store().NodeSlices("n1")
	require.NoError(t, err)
	assert.Equal(t, []string{"100.100.1.16/28"}, prefixes(t, recs), "renewal allocated nothing new")
}

// A node whose certificate predates per-node slices (its grant is the whole zone CIDR) gets a
// slice at its next renewal; so does a node whose zone gained a CIDR.
func TestRenewMovesWholeZoneGrantToASlice(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	key := newKey(t)
	serial, err := ta.Store().AllocateSerial()
	require.NoError(t, err)
	legacy, err := identity.Issue(ta.cert, ta.key, identity.IssueRequest{
		ID: identity.NodeID("acme.internal", "old"), PublicKey: key.Public().(ed25519.PublicKey),
		Claims: identity.Claims{
			Zones:   []identity.ZoneGrant{{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/24")}}},
			Regions: []string{"eu-west-1"}, Fingerprint: fingerprint("old"),
		},
		NotBefore: clock.Now().Add(-time.Minute), NotAfter: clock.Now().Add(time.Hour), Serial: new(big.Int).SetUint64(serial),
	})
	require.NoError(t, err)
	r, err := Renew(context.Background(), RenewParams{Addr: ta.addr, Authority: ta.cert, Current: legacy, Key: key, NewKey: newKey(t), Now: clock.Now})
	require.NoError(t, err)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}, grantOf(t, r.Node, "payments"))
}

func TestRenewAddsSliceForCIDRAddedToZone(t *testing.T) {
	clock := newTestClock()
	dir := filepath.Join(t.TempDir(), "auth")
	require.NoError(t, Init(dir, "acme.internal", writePolicy(t, testPolicy), Options{Now: clock.Now}))
	ta, stop := serveAuthority(t, dir, clock)
	j, rp := joinNode(t, ta, clock, "n1")
	stop()

	// `ute policy apply`: payments gains an IPv6 CIDR.
	dual := `zones:
  - name: payments
    cidr: [100.100.1.0/24, "fd00:100:1::/64"]
    regions: [eu-west-1]
    min_trust: 50
    isolate_below: 20
`
	st, err := OpenStore(filepath.Join(dir, FileStore), time.Second)
	require.NoError(t, err)
	require.NoError(t, st.SetPolicy([]byte(dual)))
	require.NoError(t, st.Close())

	ta2, _ := serveAuthority(t, dir, clock)
	rp.Addr = ta2.addr
	r, err := Renew(context.Background(), rp)
	require.NoError(t, err)
	assert.Equal(t, []netip.Prefix{grantOf(t, j.Node, "payments")[0], netip.MustParsePrefix("fd00:100:1::/72")}, grantOf(t, r.Node, "payments"))
}

// BenchmarkAllocateSliceAfter1000 measures one join's slice allocation in a zone where 1,000 nodes
// already hold slices (the search walks past them from the bottom of the CIDR). Each iteration's
// transaction is rolled back, so every iteration sees the same 1,000 slices and no fsync is timed.
func BenchmarkAllocateSliceAfter1000(b *testing.B) {
	s, err := OpenStore(filepath.Join(b.TempDir(), "authority.db"), time.Second)
	require.NoError(b, err)
	b.Cleanup(func() { _ = s.Close() })
	r := req("z", "10.0.0.0/8", 28)
	require.NoError(b, s.db.Update(func(tx *bolt.Tx) error {
		for i := range 1000 {
			if _, err := allocateSlice(tx, r, fmt.Sprint("n", i), 1, time.Unix(1, 0)); err != nil {
				return err
			}
		}
		return nil
	}))
	errRollback := errors.New("rollback")
	b.ResetTimer()
	for range b.N {
		err := s.db.Update(func(tx *bolt.Tx) error {
			rec, err := allocateSlice(tx, r, "new", 2, time.Unix(2, 0))
			if err != nil {
				return err
			}
			if rec.Prefix != "10.0.62.128/28" {
				return fmt.Errorf("allocated %s", rec.Prefix)
			}
			return errRollback
		})
		if !errors.Is(err, errRollback) {
			b.Fatal(err)
		}
	}
}
