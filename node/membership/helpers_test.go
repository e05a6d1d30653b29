package membership

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/overlay/gossip"
	"github.com/ute-project/ute/overlay/gossip/gossiptest"
	"github.com/ute-project/ute/overlay/tunnel"
)

const td = "acme.internal"

var (
	errUnsigned     = errors.New("test record: unsigned or truncated")
	errBadSignature = errors.New("test record: signature does not verify")
)

// signer makes the signed records the test store accepts: signature (64 bytes) then body.
type signer struct{ key ed25519.PrivateKey }

func newSigner(t testing.TB) signer {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	return signer{k}
}

func (s signer) sign(body []byte) []byte {
	return append(ed25519.Sign(s.key, body), body...)
}

func (s signer) record(t testing.TB, size int) []byte {
	body := make([]byte, size)
	_, err := rand.Read(body)
	require.NoError(t, err)
	return s.sign(body)
}

// store is a real Records implementation: it verifies an Ed25519 signature before it keeps a
// record, per zone.
type store struct {
	pub ed25519.PublicKey

	mu      sync.Mutex
	byZone  map[string]map[[32]byte][]byte
	refused int
}

func newStore(s signer) *store {
	return &store{pub: s.key.Public().(ed25519.PublicKey), byZone: map[string]map[[32]byte][]byte{}}
}

func (s *store) Add(zone string, raw []byte) (bool, error) {
	if len(raw) <= ed25519.SignatureSize {
		s.count()
		return false, fmt.Errorf("%w: %d bytes", errUnsigned, len(raw))
	}
	if !ed25519.Verify(s.pub, raw[ed25519.SignatureSize:], raw[:ed25519.SignatureSize]) {
		s.count()
		return false, errBadSignature
	}
	return s.put(zone, raw), nil
}

func (s *store) count() {
	s.mu.Lock()
	s.refused++
	s.mu.Unlock()
}

func (s *store) put(zone string, raw []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	z := s.byZone[zone]
	if z == nil {
		z = map[[32]byte][]byte{}
		s.byZone[zone] = z
	}
	h := sha256.Sum256(raw)
	if _, ok := z[h]; ok {
		return false
	}
	z[h] = append([]byte(nil), raw...)
	return true
}

func (s *store) Snapshot(zone string) [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out [][]byte
	for _, r := range s.byZone[zone] {
		out = append(out, r)
	}
	return out
}

// holds reports whether the store holds raw in any zone (zone "" ) or in zone.
func (s *store) holds(zone string, raw []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := sha256.Sum256(raw)
	for z, m := range s.byZone {
		if zone != "" && z != zone {
			continue
		}
		if _, ok := m[h]; ok {
			return true
		}
	}
	return false
}

func (s *store) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.byZone {
		n += len(m)
	}
	return n
}

type member struct {
	*gossiptest.Node
	m     *Membership
	store *store
}

type clusterOpts struct {
	timing    Timing
	noRequeue bool
	// Join's concurrency and per-seed dial bound; zero takes the defaults.
	joinParallel    int
	joinSeedTimeout time.Duration
	// dialer, when set, wraps the node's endpoint as the Membership sees it (fault injection).
	dialer func(*tunnel.Endpoint) gossip.Dialer
}

// startMember starts a node with a Membership holding a pool per zone.
func startMember(t testing.TB, auth *gossiptest.Authority, sg signer, name string, zones []string, nopt gossiptest.NodeOptions, copt clusterOpts) *member {
	t.Helper()
	n := gossiptest.StartNode(t, auth, name, zones, nopt)
	st := newStore(sg)
	timing := copt.timing
	if timing == (Timing{}) {
		timing = FastTiming()
	}
	var ep gossip.Dialer = n.Endpoint
	if copt.dialer != nil {
		ep = copt.dialer(n.Endpoint)
	}
	m, err := New(Config{
		NodeID:    n.ID,
		Advertise: n.Addr,
		Endpoint:  ep,
		Mux:       n.Mux,
		Records:   st,
		Revoked:   n.Verifier.Revoked,
		Timing:    timing,
		NoRequeue: copt.noRequeue,

		JoinParallel:    copt.joinParallel,
		JoinSeedTimeout: copt.joinSeedTimeout,
		// Closing dozens of pools one after another must not cost half a second each.
		LeaveTimeout: 50 * time.Millisecond,
		Logger:       gossiptest.QuietLogger(),
	})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	for _, z := range zones {
		require.NoError(t, m.AddZone(z))
	}
	return &member{Node: n, m: m, store: st}
}

func seedOf(n *member) Seed { return Seed{NodeID: n.ID, Addr: n.Addr} }

// joinAll joins every member's zone pools through the first member of each zone, all at once.
func joinAll(t testing.TB, ms []*member) {
	t.Helper()
	seeds := map[string]*member{}
	var wg sync.WaitGroup
	for _, m := range ms {
		for _, z := range m.Zones {
			s, ok := seeds[z]
			if !ok {
				seeds[z] = m
				continue
			}
			wg.Go(func() {
				// A daemon retries a failed join; so does the test, since a loaded machine
				// under -race can exceed a push/pull timeout while 20 nodes join at once.
				var err error
				for range 3 {
					if _, err = m.m.Join(ctxT(t), z, []Seed{seedOf(s)}); err == nil {
						return
					}
				}
				assert.NoError(t, err, "%s joins %s", m.Name, z)
			})
		}
	}
	wg.Wait()
}

// waitMembers waits until every member of zone sees want members there.
func waitMembers(t testing.TB, ms []*member, zone string, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, m := range ms {
		for len(m.m.Members(zone)) != want {
			if time.Now().After(deadline) {
				seen := map[string]bool{}
				for _, mem := range m.m.Members(zone) {
					seen[mem.NodeID] = true
				}
				var missing []string
				for _, o := range ms {
					if !seen[o.ID] {
						missing = append(missing, o.Name)
					}
				}
				t.Fatalf("%s sees %d members of %s, want %d; missing %v", m.Name, len(seen), zone, want, missing)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// waitHeld waits until every member holds raw and returns how long that took from start.
func waitHeld(t testing.TB, ms []*member, raw []byte, start time.Time, within time.Duration) time.Duration {
	t.Helper()
	for {
		missing := 0
		for _, m := range ms {
			if !m.store.holds("", raw) {
				missing++
			}
		}
		if missing == 0 {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%d of %d members lack the record after %s", missing, len(ms), within)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func inZone(ms []*member, zone string) []*member {
	var out []*member
	for _, m := range ms {
		for _, z := range m.Zones {
			if z == zone {
				out = append(out, m)
				break
			}
		}
	}
	return out
}
