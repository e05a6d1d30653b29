package wireguard

import (
	"crypto/ed25519"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

func binding(node *identity.Certificate, key Key, zones ...string) Binding {
	return Binding{Node: node.ID.String(), Zones: zones, Key: key, Endpoint: netip.MustParseAddrPort("192.0.2.1:7445"),
		IssuedAt: t0, Expires: t0.Add(BindingLifetime)}
}

func TestBindingRoundTrip(t *testing.T) {
	p := newTestPKI(t)
	kp := mustKeyPair(t)
	raw, err := SignBinding(binding(p.n1, kp.Public, "payments", "support"), p.n1Key)
	require.NoError(t, err)
	b, err := VerifyBinding(raw, p.n1, "support", t0.Add(time.Minute))
	require.NoError(t, err)
	require.Equal(t, p.n1.ID.String(), b.Node)
	require.Equal(t, kp.Public, b.Key)
	require.Equal(t, []string{"payments", "support"}, b.Zones)
	require.Equal(t, "192.0.2.1:7445", b.Endpoint.String())
	require.Equal(t, raw, b.Raw())
}

// TestBindingRefusals is the attacker's side: every way of getting a WireGuard key configured
// for a node without that node's signature over exactly that key is refused with its sentinel.
func TestBindingRefusals(t *testing.T) {
	p := newTestPKI(t)
	mine, theirs := mustKeyPair(t), mustKeyPair(t)
	good, err := SignBinding(binding(p.n1, mine.Public, "payments"), p.n1Key)
	require.NoError(t, err)
	n2Good, err := SignBinding(binding(p.n2, theirs.Public, "payments"), p.n2Key)
	require.NoError(t, err)
	// n2 signs a statement that n1 holds n2's key (a valid format, signed by someone else).
	forged, err := SignBinding(binding(p.n1, theirs.Public, "payments"), p.n2Key)
	require.NoError(t, err)
	// n1 signs a binding naming n2 (replayed for another node).
	forOther, err := SignBinding(binding(p.n2, mine.Public, "payments"), p.n1Key)
	require.NoError(t, err)
	// The key substituted in the signed bytes.
	substituted := append([]byte(nil), good...)
	idx := indexOf(substituted, mine.Public[:])
	require.Positive(t, idx)
	copy(substituted[idx:], theirs.Public[:])
	// A revocation record n1 signed: right key, another kind (AAD) and shape.
	rev, err := record.SignRevocation(record.NodeRevocation(p.n1, "test", t0), p.n1Key)
	require.NoError(t, err)
	otherZone, err := SignBinding(binding(p.n1, mine.Public, "support"), p.n1Key)
	require.NoError(t, err)
	ungranted, err := SignBinding(binding(p.n2, theirs.Public, "payments", "support"), p.n2Key)
	require.NoError(t, err)
	zero, err := SignBinding(binding(p.n1, Key{}, "payments"), p.n1Key)
	require.NoError(t, err)
	expired := binding(p.n1, mine.Public, "payments")
	expired.IssuedAt, expired.Expires = t0.Add(-2*time.Hour), t0.Add(-time.Hour)
	expiredRaw, err := SignBinding(expired, p.n1Key)
	require.NoError(t, err)
	// n1 renewed: the same identity and grants, a new node key. Its binding signed with either key
	// verifies only against the certificate of that key, whichever is newer.
	renewedKey := mustKey(t)
	renewed := issueNode(t, p, renewedKey, "n1",
		identity.ZoneGrant{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}},
		identity.ZoneGrant{Name: "support", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.2.0/28")}})
	byRenewed, err := SignBinding(binding(renewed, mine.Public, "payments"), renewedKey)
	require.NoError(t, err)
	_, err = VerifyBinding(byRenewed, renewed, "payments", t0)
	require.NoError(t, err)
	future := binding(p.n1, mine.Public, "payments")
	future.IssuedAt, future.Expires = t0.Add(time.Hour), t0.Add(2*time.Hour)
	futureRaw, err := SignBinding(future, p.n1Key)
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		raw  []byte
		cert *identity.Certificate
		zone string
		want error
	}{
		{"another node's valid binding on n1's tunnel", n2Good, p.n1, "payments", ErrBindingSignature},
		{"n1's identity with a key, signed by n2", forged, p.n1, "payments", ErrBindingSignature},
		{"signed by n1's renewed key, on a tunnel that proved the old certificate", byRenewed, p.n1, "payments", ErrBindingSignature},
		{"signed by n1's old key, on a tunnel that proved the renewed certificate", good, renewed, "payments", ErrBindingSignature},
		{"key substituted in the signed bytes", substituted, p.n1, "payments", ErrBindingSignature},
		{"n1 binds a key for n2", forOther, p.n1, "payments", ErrBindingNode},
		{"a revocation signed by the node", rev, p.n1, "payments", ErrBindingSignature},
		{"binding does not name the tunnel's zone", otherZone, p.n1, "payments", ErrBindingZone},
		{"binding names a zone the certificate lacks", ungranted, p.n2, "payments", ErrBindingZone},
		{"all-zero key", zero, p.n1, "payments", ErrBindingKey},
		{"expired", expiredRaw, p.n1, "payments", ErrBindingExpired},
		{"issued in the future", futureRaw, p.n1, "payments", ErrBindingExpired},
		{"not COSE", []byte("hello"), p.n1, "payments", ErrBindingMalformed},
		{"oversized", make([]byte, MaxBindingSize+1), p.n1, "payments", ErrBindingMalformed},
		{"no certificate", good, nil, "payments", ErrBindingSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := VerifyBinding(tc.raw, tc.cert, tc.zone, t0)
			require.ErrorIs(t, err, tc.want)
			require.Nil(t, b)
		})
	}
}

func TestSignBindingRefusesBadClaims(t *testing.T) {
	p := newTestPKI(t)
	kp := mustKeyPair(t)
	b := binding(p.n1, kp.Public, "payments")
	b.Endpoint = netip.MustParseAddrPort("0.0.0.0:7445")
	_, err := SignBinding(b, p.n1Key)
	require.ErrorIs(t, err, ErrBindingMalformed)
	_, err = SignBinding(binding(p.n1, kp.Public), p.n1Key)
	require.ErrorIs(t, err, ErrBindingMalformed)
	_, err = SignBinding(binding(p.n1, kp.Public, "payments"), ed25519.PrivateKey{1})
	require.Error(t, err)
}

func indexOf(b, sub []byte) int {
	for i := 0; i+len(sub) <= len(b); i++ {
		if string(b[i:i+len(sub)]) == string(sub) {
			return i
		}
	}
	return -1
}

func FuzzVerifyBinding(f *testing.F) {
	p := newTestPKI(f)
	kp := mustKeyPair(f)
	good, err := SignBinding(binding(p.n1, kp.Public, "payments"), p.n1Key)
	require.NoError(f, err)
	f.Add(good)
	f.Add([]byte{0xd2, 0x84})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		b, err := VerifyBinding(raw, p.n1, "payments", t0)
		if err == nil && (b == nil || b.Node != p.n1.ID.String() || b.Key.IsZero()) {
			t.Fatalf("accepted a binding that is not n1's: %+v", b)
		}
	})
}
