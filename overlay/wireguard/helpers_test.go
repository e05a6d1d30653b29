package wireguard

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

const testTD = "acme.internal"

// t0 is a fixed instant so that binding tests never depend on the wall clock.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// testPKI is a real trust domain: an authority and nodes n1, n2 (zone payments, disjoint
// slices; n1 also holds support).
type testPKI struct {
	authKey, n1Key, n2Key ed25519.PrivateKey
	auth, n1, n2          *identity.Certificate
}

func mustKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	k, err := identity.GenerateKey()
	require.NoError(t, err)
	return k
}

func issueNode(t testing.TB, p *testPKI, key ed25519.PrivateKey, name string, grants ...identity.ZoneGrant) *identity.Certificate {
	t.Helper()
	fp := sha256.Sum256([]byte("host " + name))
	c, err := identity.Issue(p.auth, p.authKey, identity.IssueRequest{
		ID: identity.NodeID(testTD, name), PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    identity.Claims{Zones: grants, Regions: []string{"eu-west-1"}, Fingerprint: fp[:]},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(48 * time.Hour),
	})
	require.NoError(t, err)
	return c
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p := &testPKI{authKey: mustKey(t), n1Key: mustKey(t), n2Key: mustKey(t)}
	var err error
	p.auth, err = identity.NewAuthority(testTD, p.authKey, t0.Add(-time.Hour), 366*24*time.Hour)
	require.NoError(t, err)
	p.n1 = issueNode(t, p, p.n1Key, "n1",
		identity.ZoneGrant{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.0/28")}},
		identity.ZoneGrant{Name: "support", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.2.0/28")}})
	p.n2 = issueNode(t, p, p.n2Key, "n2",
		identity.ZoneGrant{Name: "payments", Prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.1.16/28")}})
	return p
}

func mustKeyPair(t testing.TB) KeyPair {
	t.Helper()
	kp, err := GenerateKeyPair()
	require.NoError(t, err)
	return kp
}

// packet builds an IPv4 or IPv6 packet of tuple tp with payload bytes after a minimal header
// (20-byte TCP or 8-byte UDP; checksums are not computed: the filter does not read them).
func packet(tp Tuple, payload int) []byte {
	l4 := 8
	if tp.Proto == ProtoTCP {
		l4 = 20
	}
	var p []byte
	if tp.Src.Is4() {
		p = make([]byte, 20+l4+payload)
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
		p[8] = 64
		p[9] = tp.Proto
		s, d := tp.Src.As4(), tp.Dst.As4()
		copy(p[12:16], s[:])
		copy(p[16:20], d[:])
		binary.BigEndian.PutUint16(p[20:22], tp.SrcPort)
		binary.BigEndian.PutUint16(p[22:24], tp.DstPort)
		if tp.Proto == ProtoTCP {
			p[20+12] = 5 << 4
		}
		return p
	}
	p = make([]byte, 40+l4+payload)
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(l4+payload))
	p[6] = tp.Proto
	p[7] = 64
	s, d := tp.Src.As16(), tp.Dst.As16()
	copy(p[8:24], s[:])
	copy(p[24:40], d[:])
	binary.BigEndian.PutUint16(p[40:42], tp.SrcPort)
	binary.BigEndian.PutUint16(p[42:44], tp.DstPort)
	return p
}

func tcp(src, dst string) Tuple {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	return Tuple{Src: s.Addr(), Dst: d.Addr(), SrcPort: s.Port(), DstPort: d.Port(), Proto: ProtoTCP}
}
