package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

func TestJoinIssuesNodeCertificate(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	tok := ta.token(t, TokenSpec{Zones: []string{"payments", "research"}})
	p := joinParams(t, ta, tok, "n1", clock)
	j, err := Join(context.Background(), p)
	require.NoError(t, err)

	assert.Equal(t, identity.NodeID("acme.internal", "n1"), j.Node.ID)
	assert.Equal(t, []string{"payments", "research"}, j.Node.Claims.ZoneNames())
	g, ok := j.Node.Claims.Zone("payments")
	require.True(t, ok)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}, g.Prefixes, "the node's own slice, never the zone CIDR")
	assert.Equal(t, []string{"eu-west-1"}, j.Node.Claims.Regions, "the only region common to both zones")
	assert.Equal(t, fingerprint("n1"), j.Node.Claims.Fingerprint)
	assert.Equal(t, testPolicy, string(j.Policy))
	assert.WithinDuration(t, clock.Now().Add(DefaultNodeLifetime), j.Node.X509.NotAfter, time.Second)
	require.NoError(t, identity.Verifier{Authority: ta.Certificate()}.VerifyNode(j.Node, clock.Now()))
	assert.False(t, j.Node.X509.IsCA, "the node certificate is a leaf")

	// The issuing certificate: a CA for the node's agents, bound to this node certificate, for
	// the issuing key derived from the node key, valid exactly as long.
	require.NotNil(t, j.Issuer)
	require.NoError(t, identity.Verifier{Authority: ta.Certificate()}.VerifyIssuer(j.Issuer, clock.Now()))
	assert.True(t, j.Issuer.Issuing)
	assert.Equal(t, j.Node.ID, j.Issuer.ID)
	assert.Equal(t, j.Node.Serial(), j.Issuer.NodeSerial())
	assert.Equal(t, j.Node.Claims.Zones, j.Issuer.Claims.Zones)
	assert.Equal(t, j.Node.X509.NotAfter, j.Issuer.X509.NotAfter)
	assert.NotEqual(t, j.Node.PublicKey(), j.Issuer.PublicKey())

	issued, err := ta.Store().Issued()
	require.NoError(t, err)
	require.Len(t, issued, 1)
	assert.Equal(t, j.Node.Serial().Uint64(), issued[0].Serial)
	assert.Equal(t, "spiffe://acme.internal/node/n1", issued[0].SPIFFEID)

	recs, err := ta.Audit()
	require.NoError(t, err)
	last := recs[len(recs)-1]
	assert.Equal(t, "join", last.Event)
	assert.Equal(t, OutcomeIssued, last.Outcome)
}

func lastAudit(t *testing.T, ta *testAuthority) AuditRecord {
	t.Helper()
	recs, err := ta.Audit()
	require.NoError(t, err)
	require.NotEmpty(t, recs)
	return recs[len(recs)-1]
}

func TestJoinRefusals(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	ctx := context.Background()

	t.Run("replay", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		_, err := Join(ctx, joinParams(t, ta, tok, "r1", clock))
		require.NoError(t, err)
		_, err = Join(ctx, joinParams(t, ta, tok, "r2", clock))
		require.ErrorIs(t, err, ErrTokenUsed)
		rec := lastAudit(t, ta)
		assert.Equal(t, OutcomeRefused, rec.Outcome)
		assert.Equal(t, CodeTokenUsed, rec.WireCode)
	})
	t.Run("expired", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}, TTL: time.Minute})
		clock.Advance(2 * time.Minute)
		_, err := Join(ctx, joinParams(t, ta, tok, "e1", clock))
		require.ErrorIs(t, err, ErrTokenExpired)
		assert.Equal(t, CodeTokenExpired, lastAudit(t, ta).WireCode)
	})
	t.Run("tampered secret", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		parsed, err := identity.ParseToken(tok)
		require.NoError(t, err)
		parsed.Secret[0] ^= 0xff
		_, err = Join(ctx, joinParams(t, ta, parsed.String(), "x1", clock))
		require.ErrorIs(t, err, ErrTokenUnknown)
		// The real token is untouched by the forgery.
		_, err = Join(ctx, joinParams(t, ta, tok, "x1", clock))
		require.NoError(t, err)
	})
	t.Run("tampered secret of a used token says unknown, not used", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		_, err := Join(ctx, joinParams(t, ta, tok, "u1", clock))
		require.NoError(t, err)
		parsed, err := identity.ParseToken(tok)
		require.NoError(t, err)
		parsed.Secret[5] ^= 1
		_, err = Join(ctx, joinParams(t, ta, parsed.String(), "u2", clock))
		require.ErrorIs(t, err, ErrTokenUnknown)
	})
	t.Run("unknown id", func(t *testing.T) {
		other, err := identity.NewToken(ta.Pin())
		require.NoError(t, err)
		_, err = Join(ctx, joinParams(t, ta, other.String(), "k1", clock))
		require.ErrorIs(t, err, ErrTokenUnknown)
		assert.Equal(t, CodeTokenUnknown, lastAudit(t, ta).WireCode)
	})
	t.Run("malformed", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		_, err := Join(ctx, joinParams(t, ta, tok[:len(tok)-1], "m1", clock))
		require.ErrorIs(t, err, ErrMalformedToken)
		_, err = Join(ctx, joinParams(t, ta, strings.ToUpper(tok), "m1", clock))
		require.ErrorIs(t, err, ErrMalformedToken)
	})
	t.Run("region outside token", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"research"}, Regions: []string{"us-east-1"}})
		p := joinParams(t, ta, tok, "g1", clock)
		p.Region = "eu-west-1"
		_, err := Join(ctx, p)
		require.ErrorIs(t, err, ErrTokenRegion)
		p.Region = "us-east-1"
		j, err := Join(ctx, p)
		require.NoError(t, err, "a refused region must not consume the token")
		assert.Equal(t, []string{"us-east-1"}, j.Node.Claims.Regions)
	})
	t.Run("region outside placement", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		p := joinParams(t, ta, tok, "g2", clock)
		p.Region = "us-east-1"
		_, err := Join(ctx, p)
		require.ErrorIs(t, err, ErrTokenRegion)
	})
	t.Run("ambiguous region", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"research"}})
		_, err := Join(ctx, joinParams(t, ta, tok, "g3", clock))
		require.ErrorIs(t, err, ErrTokenRegion)
	})
	t.Run("token for another zone", func(t *testing.T) {
		_, err := ta.CreateToken(ctx, TokenSpec{Zones: []string{"nope"}})
		require.ErrorIs(t, err, ErrZoneUnknown)
		_, err = ta.CreateToken(ctx, TokenSpec{Zones: []string{"payments"}, Regions: []string{"us-east-1"}})
		require.ErrorIs(t, err, ErrRegionUnknown)
	})
	t.Run("CSR without key possession", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		csr, err := createCSR(newKey(t), "c1", "", fingerprint("c1"))
		require.NoError(t, err)
		forged := forgeCSRKey(t, csr, newKey(t).Public().(ed25519.PublicKey))
		parsed, err := identity.ParseToken(tok)
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
			JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: forged})
		require.ErrorIs(t, err, ErrCSR)
		assert.Equal(t, CodeCSR, lastAudit(t, ta).WireCode)
		_, err = Join(ctx, joinParams(t, ta, tok, "c1", clock))
		require.NoError(t, err, "a refused CSR must not consume the token")
	})
	t.Run("no issuing-key CSR or the node key as issuing key", func(t *testing.T) {
		tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
		parsed, err := identity.ParseToken(tok)
		require.NoError(t, err)
		key := newKey(t)
		csr, err := createCSR(key, "c2", "", fingerprint("c2"))
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
			JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: csr})
		require.ErrorIs(t, err, ErrCSR, "a node from before issuing certificates")
		assert.Contains(t, err.Error(), "issuing-key CSR")
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
			JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: csr, IssuerCSR: csr})
		require.ErrorIs(t, err, ErrCSR)
		assert.Contains(t, err.Error(), "must differ from the node key")
		other, err := createCSR(newKey(t), "c3", "", fingerprint("c2"))
		require.NoError(t, err)
		_, err = roundTrip(ctx, ta.addr, func(tls.ConnectionState) error { return nil }, nil, OpJoin,
			JoinRequest{TokenID: parsed.ID, Secret: parsed.Secret, CSR: csr, IssuerCSR: other})
		require.ErrorIs(t, err, ErrCSR)
		assert.Contains(t, err.Error(), "names \"c3\"")
		_, err = Join(ctx, joinParams(t, ta, tok, "c2", clock))
		require.NoError(t, err, "refused issuing-key CSRs must not consume the token")
	})
}

func TestJoinConcurrentReplayExactlyOne(t *testing.T) {
	clock := newTestClock()
	ta := startAuthority(t, clock)
	tok := ta.token(t, TokenSpec{Zones: []string{"payments"}})
	before, err := ta.Store().Issued()
	require.NoError(t, err)

	const n = 20
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		ok      []*Joined
		used    int
		unknown []error
	)
	for i := range n {
		p := joinParams(t, ta, tok, "n"+string(rune('a'+i)), clock)
		wg.Go(func() {
			j, err := Join(context.Background(), p)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok = append(ok, j)
			case errors.Is(err, ErrTokenUsed):
				used++
			default:
				unknown = append(unknown, err)
			}
		})
	}
	wg.Wait()
	require.Empty(t, unknown)
	require.Len(t, ok, 1)
	assert.Equal(t, n-1, used)
	after, err := ta.Store().Issued()
	require.NoError(t, err)
	assert.Len(t, after, len(before)+1, "exactly one certificate issued")
	meta, err := ta.Store().Meta()
	require.NoError(t, err)
	assert.Equal(t, ok[0].Node.Serial().Uint64(), meta.LastSerial, "exactly one serial allocated")
}

func TestJoinRefusesImpostorAuthorityBeforeSendingSecret(t *testing.T) {
	clock := newTestClock()
	real := startAuthority(t, clock)
	impostor := startAuthority(t, clock)
	tok := real.token(t, TokenSpec{Zones: []string{"payments"}})
	before, err := impostor.Audit()
	require.NoError(t, err)

	p := joinParams(t, real, tok, "n1", clock)
	p.Addr = impostor.addr
	_, err = Join(context.Background(), p)
	require.ErrorIs(t, err, ErrPinMismatch)
	assert.Contains(t, err.Error(), "authority key does not match the token's pin")

	after, err := impostor.Audit()
	require.NoError(t, err)
	assert.Equal(t, before, after, "the impostor must not have received any request")
	issued, err := impostor.Store().Issued()
	require.NoError(t, err)
	assert.Empty(t, issued)
	// The token is still good at the real authority.
	_, err = Join(context.Background(), joinParams(t, real, tok, "n1", clock))
	require.NoError(t, err)
}
