package dtl

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// revocations is a real (in-memory) revocation set keyed by canonical identity.
type revocations struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (r *revocations) revoke(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids[id] = true
}

func (r *revocations) Revoked(ids ...string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(ids, func(id string) bool { return r.ids[id] })
}

var errNotAllowed = errors.New("rule: billing-* may not reach ledger on this port")

type admitEnv struct {
	f       *fixture
	v       *Verifier
	revoked *revocations
	now     time.Time
}

func newAdmitEnv(t testing.TB) *admitEnv {
	t.Helper()
	f := newFixture(t)
	e := &admitEnv{f: f, revoked: &revocations{ids: map[string]bool{}}, now: f.now}
	e.v = &Verifier{
		Chains:     x509Chains{authority: f.auth.cert},
		Revocation: e.revoked,
		Policy: PolicyFunc(func(a *AgentInfo, c *Claims) error {
			if c.Destination.Port == 22 {
				return errNotAllowed
			}
			return nil
		}),
		MinTrust: func(zone string) (int, bool) {
			switch zone {
			case "payments":
				return 50, true
			case "support":
				return 10, true
			}
			return 0, false
		},
		Now: func() time.Time { return e.now },
	}
	return e
}

func session(t testing.TB, peer *testNode, zone string) *Session {
	t.Helper()
	return &Session{AAD: aad(t), PeerNode: peer.id(), Zone: zone, Replay: &ReplayWindow{}, Chains: NewChainCache(8)}
}

func requireDenied(t *testing.T, err error, code ReasonCode, sentinel error) {
	t.Helper()
	require.ErrorIs(t, err, sentinel)
	var d *Denial
	require.ErrorAs(t, err, &d)
	assert.Equal(t, code, d.Code, "reason code for %v", err)
	assert.Equal(t, code.String(), d.Reason)
	body, berr := d.RejectBody()
	require.NoError(t, berr)
	rej, derr := DecodeReject(body)
	require.NoError(t, derr)
	assert.Equal(t, code, rej.Code)
	assert.ErrorIs(t, rej, ErrRejected)
	if code != ReasonInternal && code != ReasonMalformed {
		assert.ErrorIs(t, rej, code.Sentinel(), "the dialing side can match the reason")
	}
}

func TestAdmitAcceptsValidRecord(t *testing.T) {
	e := newAdmitEnv(t)
	s := session(t, e.f.n1, "payments")
	raw := mustSign(t, claimsFor(e.f.alice, 1, e.now), e.f.alice.key, s.AAD)
	ad, err := e.v.Admit(s, raw)
	require.NoError(t, err)
	assert.Equal(t, e.f.alice.id(), ad.Agent.Agent)
	assert.Equal(t, e.f.n1.id(), ad.Agent.Node)
	assert.Equal(t, "payments", ad.Agent.Zone)
	assert.Equal(t, uint64(1), ad.Claims().Seq)
	assert.Equal(t, 1, s.Chains.Len(), "an admitted chain is cached for the session")
}

func TestAdmitRefusals(t *testing.T) {
	e := newAdmitEnv(t)
	f := e.f
	other := newAuthority(t)
	foreignNode := other.node(t, "n1")
	foreign := foreignNode.agent(t, "payments", "alice", time.Now().Add(time.Hour))
	expired := f.n1.agent(t, "payments", "old", time.Now().Add(-time.Minute))

	cases := []struct {
		name    string
		zone    string
		peer    *testNode
		signer  *testAgent // key used to sign; defaults to the claims' agent
		claims  func(s *Session) *Claims
		prepare func()
		code    ReasonCode
		want    error
	}{
		{name: "agent of another node on this tunnel", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(f.bob, 1, e.now) },
			code:   ReasonPeer, want: ErrPeer},
		{name: "valid signature by a key other than the chain's agent", peer: f.n1, signer: f.carol,
			claims: func(*Session) *Claims { return claimsFor(f.alice, 1, e.now) },
			code:   ReasonSignature, want: ErrSignature},
		{name: "chain from another trust domain's authority", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(foreign, 1, e.now) },
			code:   ReasonChain, want: ErrChain},
		{name: "expired agent certificate", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(expired, 1, e.now) },
			code:   ReasonChain, want: ErrChain},
		{name: "agent of another zone", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.carol, 1, e.now)
				c.Zone = "payments" // claims the tunnel's zone; the certificate says support
				return c
			},
			code: ReasonZone, want: ErrZone},
		{name: "zone claim differs from tunnel", zone: "support", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(f.alice, 1, e.now) },
			code:   ReasonZone, want: ErrZone},
		{name: "agent claim differs from certificate", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				c.Agent = "spiffe://acme.internal/zone/payments/agent/admin"
				return c
			},
			code: ReasonClaimMismatch, want: ErrClaimMismatch},
		{name: "node claim differs from certificate", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				c.Node = f.n2.id()
				return c
			},
			code: ReasonClaimMismatch, want: ErrClaimMismatch},
		{name: "fingerprint differs without drift flag", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				c.Fingerprint = make([]byte, 32)
				return c
			},
			code: ReasonClaimMismatch, want: ErrClaimMismatch},
		{name: "revoked agent", peer: f.n1,
			claims:  func(*Session) *Claims { return claimsFor(f.alice, 1, e.now) },
			prepare: func() { e.revoked.revoke(f.alice.id()) },
			code:    ReasonRevoked, want: ErrRevoked},
		{name: "revoked node", peer: f.n1,
			claims:  func(*Session) *Claims { return claimsFor(f.alice, 1, e.now) },
			prepare: func() { e.revoked.revoke(f.n1.cert.SerialNumber.String()) },
			code:    ReasonRevoked, want: ErrRevoked},
		{name: "policy denies", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				c.Destination.Port = 22
				return c
			},
			code: ReasonPolicy, want: errNotAllowed},
		{name: "trust below zone minimum", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				c.Trust = 49
				return c
			},
			code: ReasonTrust, want: ErrTrust},
		{name: "stale", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(f.alice, 1, e.now.Add(-DefaultSkew-time.Second)) },
			code:   ReasonStale, want: ErrStale},
		{name: "future", peer: f.n1,
			claims: func(*Session) *Claims { return claimsFor(f.alice, 1, e.now.Add(DefaultSkew+time.Second)) },
			code:   ReasonFuture, want: ErrFuture},
		{name: "chain hash never sent on this session", peer: f.n1,
			claims: func(*Session) *Claims {
				c := claimsFor(f.alice, 1, e.now)
				h := c.Chain.Hash()
				c.Chain, c.ChainHash = nil, h[:]
				return c
			},
			code: ReasonChainUnknown, want: ErrChainUnknown},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.revoked.ids = map[string]bool{}
			if tc.prepare != nil {
				tc.prepare()
			}
			zone := tc.zone
			if zone == "" {
				zone = "payments"
			}
			s := session(t, tc.peer, zone)
			c := tc.claims(s)
			signer := tc.signer
			if signer == nil {
				signer = f.alice
				for _, a := range []*testAgent{f.alice, f.bob, f.carol, foreign, expired} {
					if c.Chain != nil && string(c.Chain.Agent) == string(a.der) {
						signer = a
					}
				}
			}
			_, err := e.v.Admit(s, mustSign(t, c, signer.key, s.AAD))
			requireDenied(t, err, tc.code, tc.want)
		})
	}
}

func TestAdmitReplay(t *testing.T) {
	e := newAdmitEnv(t)
	s1 := session(t, e.f.n1, "payments")
	raw := mustSign(t, claimsFor(e.f.alice, 1, e.now), e.f.alice.key, s1.AAD)
	_, err := e.v.Admit(s1, raw)
	require.NoError(t, err)

	t.Run("same session", func(t *testing.T) {
		_, err := e.v.Admit(s1, raw)
		requireDenied(t, err, ReasonReplay, ErrReplay)
	})
	t.Run("other session to the same peer", func(t *testing.T) {
		s2 := session(t, e.f.n1, "payments")
		_, err := e.v.Admit(s2, raw)
		requireDenied(t, err, ReasonSignature, ErrSignature)
	})
	t.Run("a refused record does not consume its sequence number", func(t *testing.T) {
		c := claimsFor(e.f.alice, 2, e.now)
		c.Destination.Port = 22
		_, err := e.v.Admit(s1, mustSign(t, c, e.f.alice.key, s1.AAD))
		requireDenied(t, err, ReasonPolicy, ErrPolicy)
		_, err = e.v.Admit(s1, mustSign(t, claimsFor(e.f.alice, 2, e.now), e.f.alice.key, s1.AAD))
		require.NoError(t, err)
	})
}

func TestAdmitDriftDeclared(t *testing.T) {
	e := newAdmitEnv(t)
	e.v.Chains = x509Chains{authority: e.f.auth.cert, regions: []string{"eu-west-1"}}
	s := session(t, e.f.n1, "payments")

	c := claimsFor(e.f.alice, 1, e.now)
	c.Region = "us-east-1"
	_, err := e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	requireDenied(t, err, ReasonClaimMismatch, ErrClaimMismatch)

	// Declared drift is honest: admission then rests on the trust score the sender lowered.
	c.Seq, c.Drift, c.Fingerprint = 2, DriftRegion|DriftFingerprint, make([]byte, 32)
	_, err = e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	require.NoError(t, err)
	c.Seq, c.Trust = 3, 20
	_, err = e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	requireDenied(t, err, ReasonTrust, ErrTrust)
}

func TestAdmitChainHashAfterFullChain(t *testing.T) {
	e := newAdmitEnv(t)
	s := session(t, e.f.n1, "payments")
	c := claimsFor(e.f.alice, 1, e.now)
	_, err := e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	require.NoError(t, err)

	h := c.Chain.Hash()
	c.Chain, c.ChainHash, c.Seq = nil, h[:], 2
	ad, err := e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	require.NoError(t, err)
	assert.Equal(t, e.f.alice.id(), ad.Agent.Agent)
	require.NotNil(t, ad.Agent.key, "a cached chain's flows verify with the agent key expanded once")

	// The cached chain does not lend its identity to another key: Carol's signature fails.
	c.Seq = 3
	_, err = e.v.Admit(s, mustSign(t, c, e.f.carol.key, s.AAD))
	requireDenied(t, err, ReasonSignature, ErrSignature)

	// Revocation is still checked on every record, cached chain or not.
	e.revoked.revoke(e.f.alice.id())
	c.Seq = 4
	_, err = e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	requireDenied(t, err, ReasonRevoked, ErrRevoked)

	// After the chain expires the cache re-verifies it, and the expired chain is refused.
	e.revoked.ids = map[string]bool{}
	e.now = e.now.Add(2 * time.Hour)
	c.Seq, c.IssuedAt = 5, e.now
	_, err = e.v.Admit(s, mustSign(t, c, e.f.alice.key, s.AAD))
	requireDenied(t, err, ReasonChain, ErrChain)
}

func TestAdmitFailsClosedWhenMisconfigured(t *testing.T) {
	e := newAdmitEnv(t)
	good := session(t, e.f.n1, "payments")
	raw := mustSign(t, claimsFor(e.f.alice, 1, e.now), e.f.alice.key, good.AAD)

	for name, mutate := range map[string]func(v *Verifier, s *Session){
		"no chain verifier":  func(v *Verifier, _ *Session) { v.Chains = nil },
		"no revocation":      func(v *Verifier, _ *Session) { v.Revocation = nil },
		"no policy":          func(v *Verifier, _ *Session) { v.Policy = nil },
		"no min trust":       func(v *Verifier, _ *Session) { v.MinTrust = nil },
		"no replay window":   func(_ *Verifier, s *Session) { s.Replay = nil },
		"no peer":            func(_ *Verifier, s *Session) { s.PeerNode = "" },
		"no session binding": func(_ *Verifier, s *Session) { s.AAD = nil },
	} {
		t.Run(name, func(t *testing.T) {
			v := *e.v
			s := *good
			s.Replay = &ReplayWindow{}
			mutate(&v, &s)
			_, err := v.Admit(&s, raw)
			var d *Denial
			require.ErrorAs(t, err, &d)
			assert.Equal(t, ReasonInternal, d.Code)
		})
	}
	t.Run("zone missing from policy", func(t *testing.T) {
		v := *e.v
		v.MinTrust = func(string) (int, bool) { return 0, false }
		_, err := v.Admit(session(t, e.f.n1, "payments"), mustSign(t, claimsFor(e.f.alice, 1, e.now), e.f.alice.key, good.AAD))
		require.Error(t, err)
	})
	t.Run("nil verifier", func(t *testing.T) {
		var v *Verifier
		_, err := v.Admit(good, raw)
		require.ErrorIs(t, err, ErrConfig)
	})
}

func TestCodeOfAndRejectError(t *testing.T) {
	for code := ReasonCode(1); code <= ReasonUnreachable; code++ {
		s := code.Sentinel()
		require.NotNil(t, s, code.String())
		assert.Equal(t, code, CodeOf(s), "round trip of %s", code)
		rej := &RejectError{Code: code, Message: "m"}
		assert.ErrorIs(t, rej, s)
		assert.ErrorIs(t, rej, ErrRejected)
	}
	assert.Equal(t, ReasonMalformed, CodeOf(ErrUnknownClaim))
	assert.Equal(t, ReasonReplay, CodeOf(ErrTooOld))
	assert.Equal(t, ReasonInternal, CodeOf(errors.New("disk on fire")))
	assert.Equal(t, "code(200)", ReasonCode(200).String())
	assert.Nil(t, ReasonCode(200).Sentinel())
	unknown := &RejectError{Code: 200}
	assert.NotErrorIs(t, unknown, ErrReplay)
}

func TestDenyNilFailsClosed(t *testing.T) {
	d := Deny(nil)
	assert.Equal(t, ReasonInternal, d.Code)
	require.ErrorIs(t, d, ErrConfig)
	body, err := (&Denial{Code: ReasonLimit}).RejectBody()
	require.NoError(t, err)
	rej, err := DecodeReject(body)
	require.NoError(t, err)
	assert.Equal(t, "limit", rej.Message)
	assert.ErrorIs(t, rej, ErrLimit)
}
