package dtl

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"
)

// More refusals the overlay reports with the same reason codes.
var (
	// ErrLimit: a flow-table limit (per peer, per agent) refused the flow.
	ErrLimit = errors.New("dtl: flow limit reached")
	// ErrUnreachable: the destination agent is unknown in the zone or not listening.
	ErrUnreachable = errors.New("dtl: destination unreachable")
)

// ReasonCode is the machine-readable reason a flow was refused, carried in reject frames.
// Codes are part of the wire protocol (docs/protocol.md); never renumber them.
type ReasonCode uint8

// Reason codes. ReasonInternal covers every failure that is ours rather than the record's (fail
// closed, I7).
const (
	ReasonInternal      ReasonCode = 0
	ReasonMalformed     ReasonCode = 1
	ReasonTooLarge      ReasonCode = 2
	ReasonVersion       ReasonCode = 3
	ReasonSignature     ReasonCode = 4
	ReasonChain         ReasonCode = 5
	ReasonChainUnknown  ReasonCode = 6
	ReasonPeer          ReasonCode = 7
	ReasonZone          ReasonCode = 8
	ReasonClaimMismatch ReasonCode = 9
	ReasonRevoked       ReasonCode = 10
	ReasonPolicy        ReasonCode = 11
	ReasonTrust         ReasonCode = 12
	ReasonStale         ReasonCode = 13
	ReasonFuture        ReasonCode = 14
	ReasonReplay        ReasonCode = 15
	ReasonLimit         ReasonCode = 16
	ReasonUnreachable   ReasonCode = 17
)

// reasonTable maps each code to its name and sentinel; order of lookup in classify matters only in
// that more specific sentinels are listed before the general ones they wrap.
var reasonTable = [...]struct {
	code ReasonCode
	name string
	err  error
}{
	{ReasonInternal, "internal", ErrConfig},
	{ReasonMalformed, "malformed", ErrMalformed},
	{ReasonTooLarge, "too-large", ErrTooLarge},
	{ReasonVersion, "version", ErrVersion},
	{ReasonSignature, "signature", ErrSignature},
	{ReasonChain, "chain", ErrChain},
	{ReasonChainUnknown, "chain-unknown", ErrChainUnknown},
	{ReasonPeer, "peer", ErrPeer},
	{ReasonZone, "zone", ErrZone},
	{ReasonClaimMismatch, "claim-mismatch", ErrClaimMismatch},
	{ReasonRevoked, "revoked", ErrRevoked},
	{ReasonPolicy, "policy", ErrPolicy},
	{ReasonTrust, "trust", ErrTrust},
	{ReasonStale, "stale", ErrStale},
	{ReasonFuture, "future", ErrFuture},
	{ReasonReplay, "replay", ErrReplay},
	{ReasonLimit, "limit", ErrLimit},
	{ReasonUnreachable, "unreachable", ErrUnreachable},
}

func (c ReasonCode) String() string {
	if int(c) < len(reasonTable) {
		return reasonTable[c].name
	}
	return fmt.Sprintf("code(%d)", uint8(c))
}

// Sentinel returns the error this code stands for, or nil for an unknown code.
func (c ReasonCode) Sentinel() error {
	if int(c) < len(reasonTable) {
		return reasonTable[c].err
	}
	return nil
}

// malformedKinds are decode refusals that travel as ReasonMalformed.
var malformedKinds = [...]error{ErrUnknownClaim, ErrDuplicateKey, ErrIndefinite, ErrMissingClaim, ErrTruncated, ErrFrameType}

// CodeOf classifies an error by the sentinel it wraps; anything unrecognised is ReasonInternal.
func CodeOf(err error) ReasonCode {
	for _, k := range malformedKinds {
		if errors.Is(err, k) {
			return ReasonMalformed
		}
	}
	for _, r := range reasonTable[1:] {
		if errors.Is(err, r.err) {
			return r.code
		}
	}
	return ReasonInternal
}

// Denial is a refused flow: the wire reason code, its name, and the precise error (which matches
// this package's sentinels through errors.Is).
type Denial struct {
	Code   ReasonCode
	Reason string // Code.String(), e.g. "replay"
	Err    error
}

// Deny classifies err into a Denial. A nil err still denies, as internal (fail closed).
func Deny(err error) *Denial {
	if err == nil {
		err = fmt.Errorf("%w: denial without a cause", ErrConfig)
	}
	var d *Denial
	if errors.As(err, &d) {
		return d
	}
	c := CodeOf(err)
	return &Denial{Code: c, Reason: c.String(), Err: err}
}

func denyAs(code ReasonCode, err error) *Denial {
	return &Denial{Code: code, Reason: code.String(), Err: err}
}

func (d *Denial) Error() string { return fmt.Sprintf("flow denied (%s): %v", d.Code, d.Err) }
func (d *Denial) Unwrap() error { return d.Err }

// RejectBody encodes the denial as a reject frame body.
func (d *Denial) RejectBody() ([]byte, error) {
	msg := d.Code.String()
	if d.Err != nil {
		msg = d.Err.Error()
	}
	return EncodeReject(d.Code, msg)
}

// AgentInfo is what a verified chain says about the agent; ChainVerifier fills it from the
// certificates (never from the record's claims).
type AgentInfo struct {
	Agent       string // agent SPIFFE ID
	Node        string // node SPIFFE ID
	Zone        string // the agent certificate's one zone
	AgentKey    ed25519.PublicKey
	Fingerprint []byte   // workload fingerprint in the agent certificate
	Regions     []string // allowed regions; empty means unconstrained
	Labels      map[string]string
	OverlayIP   netip.Addr // the agent certificate's overlay IP; zero when it names none
	AgentSerial string     // certificate serials, for revocation by canonical identity
	NodeSerial  string     //
	NotAfter    time.Time  // earliest expiry in the chain; a cached verification dies with it

	// ids caches RevocationIDs once the chain verified, so that a session's later flows check
	// revocation without rebuilding the list; it is never handed out, only copies are.
	ids []string
	// key is AgentKey expanded for verification once the chain verified (nil when it does not
	// decode: verification then refuses as crypto/ed25519 does); a session's later flows verify
	// with it. Read only, shared by the copies the chain cache hands out.
	key *voi.ExpandedPublicKey
}

// RevocationIDs lists the canonical identities a revocation may name for this chain: the agent's
// and its node's SPIFFE IDs and certificate serials (revoking a node revokes its agents).
func (a *AgentInfo) RevocationIDs() []string {
	if a.ids != nil {
		return slices.Clone(a.ids)
	}
	return a.buildRevocationIDs()
}

// revocationIDs is RevocationIDs without the copy, for read-only use inside this package.
func (a *AgentInfo) revocationIDs() []string {
	if a.ids != nil {
		return a.ids
	}
	return a.buildRevocationIDs()
}

func (a *AgentInfo) buildRevocationIDs() []string {
	ids := make([]string, 0, 5)
	for _, s := range []string{a.Agent, a.AgentSerial, a.Node, a.NodeSerial} {
		if s != "" {
			ids = append(ids, s)
		}
	}
	// The agent serial as issued by its node ("serial:N@<node ID>", identity/record's
	// IssuedSerialKey): what a node-signed revocation of one of its agent certificates names.
	if a.AgentSerial != "" && a.Node != "" {
		ids = append(ids, a.AgentSerial+"@"+a.Node)
	}
	return ids
}

// ChainVerifier verifies authority → node → agent at now, including zone and CIDR constraints.
type ChainVerifier interface {
	VerifyAgentChain(nodeDER, agentDER []byte, now time.Time) (AgentInfo, error)
}

// ChainVerifierFunc adapts a function to ChainVerifier.
type ChainVerifierFunc func(nodeDER, agentDER []byte, now time.Time) (AgentInfo, error)

// VerifyAgentChain calls f.
func (f ChainVerifierFunc) VerifyAgentChain(n, a []byte, now time.Time) (AgentInfo, error) {
	return f(n, a, now)
}

// RevocationChecker reports whether any of the canonical identities is revoked.
type RevocationChecker interface {
	Revoked(ids ...string) bool
}

// RevocationFunc adapts a function to RevocationChecker.
type RevocationFunc func(ids ...string) bool

// Revoked calls f.
func (f RevocationFunc) Revoked(ids ...string) bool { return f(ids...) }

// PolicyChecker decides whether the zone's rules allow this flow; a non-nil error denies it and
// is reported with ReasonPolicy.
type PolicyChecker interface {
	AllowFlow(agent *AgentInfo, c *Claims) error
}

// PolicyFunc adapts a function to PolicyChecker.
type PolicyFunc func(agent *AgentInfo, c *Claims) error

// AllowFlow calls f.
func (f PolicyFunc) AllowFlow(a *AgentInfo, c *Claims) error { return f(a, c) }

// Verifier applies every admission check in one fixed order. All fields except Now and MaxSkew are
// required; a missing one denies every flow with ReasonInternal (fail closed, I7). A Verifier is
// safe for concurrent use if its injected pieces are.
type Verifier struct {
	Chains     ChainVerifier
	Revocation RevocationChecker
	Policy     PolicyChecker
	// MinTrust returns the zone's minimum trust score; ok=false (zone unknown to the policy) denies.
	MinTrust func(zone string) (min int, ok bool)
	MaxSkew  time.Duration    // freshness tolerance; DefaultSkew when zero
	Now      func() time.Time // time.Now when nil
}

// Session is the per-tunnel state admission needs. Build one per QUIC connection after its
// handshake; its fields must not change afterwards (Replay and Chains synchronise themselves).
type Session struct {
	AAD      []byte        // Exporter value of this connection
	PeerNode string        // SPIFFE ID of the peer node, from its verified TLS certificate
	Zone     string        // the one zone this tunnel carries
	Replay   *ReplayWindow // this session's replay window
	Chains   *ChainCache   // chains admitted on this session; nil refuses hash-only records
}

// Admitted is a record that passed every check.
type Admitted struct {
	Record *Record
	Agent  AgentInfo
}

// Claims returns the verified claims.
func (a *Admitted) Claims() *Claims { return &a.Record.Claims }

// Admit verifies a received record for session s. The order is fixed and documented in
// docs/protocol.md; each step's refusal is a *Denial wrapping the step's sentinel:
//
//  1. decode: size cap, COSE_Sign1 profile, strict claims (malformed, too-large, version)
//  2. chain: inline, or by hash from this session's cache (chain-unknown)
//  3. chain verification authority → node → agent at now (chain)
//  4. signature with the verified agent key and this session's AAD (signature)
//  5. the chain's node is this tunnel's peer, and the claimed node/agent IDs are the chain's (peer,
//     claim-mismatch)
//  6. zone: claim = tunnel zone = agent certificate zone (zone)
//  7. fingerprint and region agree with the certificate unless a drift flag declares otherwise
//     (claim-mismatch)
//  8. revocation of agent or node by SPIFFE ID or serial (revoked)
//  9. zone policy (policy)
//  10. minimum trust of the zone (trust)
//  11. freshness of issued-at (stale, future)
//  12. replay window (replay) — last, so only a record that passed everything consumes its
//     sequence number, and nothing unauthenticated can move the window.
func (v *Verifier) Admit(s *Session, raw []byte) (*Admitted, error) {
	// Admission may run on a fresh goroutine (the tunnel's first flows, or a burst beyond its
	// parked workers), and Ed25519 verification is its deepest point. So the stack is grown once,
	// here, while it is shallow (growStack; on a worker whose stack already grew it costs a few
	// nanoseconds), and this frame is kept small: the result is written in place, and the checks
	// after the signature live in their own function, whose frame exists only once verification
	// has returned.
	if err := v.ready(s); err != nil {
		return nil, Deny(err)
	}
	growStack()
	now := v.now()
	rec, err := Parse(raw)
	if err != nil {
		return nil, Deny(err)
	}
	adm := &Admitted{Record: rec}
	chain, cached, err := v.resolveChain(s, &rec.Claims, now, &adm.Agent)
	if err != nil {
		return nil, Deny(err)
	}
	if err := rec.verify(adm.Agent.AgentKey, adm.Agent.key, s.AAD); err != nil {
		return nil, Deny(err)
	}
	if err := v.checkVerified(s, adm, now); err != nil {
		return nil, err
	}
	if !cached && s.Chains != nil {
		s.Chains.put(&chain, &adm.Agent)
	}
	return adm, nil
}

// checkVerified runs steps 5 to 12 of Admit on a record whose signature verified; a refusal is a
// *Denial.
//
//go:noinline
func (v *Verifier) checkVerified(s *Session, adm *Admitted, now time.Time) error {
	c, info := &adm.Record.Claims, &adm.Agent
	if info.Node != s.PeerNode {
		return Deny(fmt.Errorf("%w: chain is for node %s, tunnel peer is %s", ErrPeer, info.Node, s.PeerNode))
	}
	if c.Node != info.Node {
		return Deny(fmt.Errorf("%w: node claim %s, certificate %s", ErrClaimMismatch, c.Node, info.Node))
	}
	if c.Agent != info.Agent {
		return Deny(fmt.Errorf("%w: agent claim %s, certificate %s", ErrClaimMismatch, c.Agent, info.Agent))
	}
	if c.Zone != s.Zone || info.Zone != s.Zone {
		return Deny(fmt.Errorf("%w: record zone %q, certificate zone %q, tunnel zone %q", ErrZone, c.Zone, info.Zone, s.Zone))
	}
	if !bytes.Equal(c.Fingerprint, info.Fingerprint) && c.Drift&DriftFingerprint == 0 {
		return Deny(fmt.Errorf("%w: workload fingerprint differs from the certificate without the fingerprint drift flag", ErrClaimMismatch))
	}
	if len(info.Regions) > 0 && !slices.Contains(info.Regions, c.Region) && c.Drift&DriftRegion == 0 {
		return Deny(fmt.Errorf("%w: region %q is not in the certificate's %v without the region drift flag", ErrClaimMismatch, c.Region, info.Regions))
	}
	if v.Revocation.Revoked(info.revocationIDs()...) {
		return Deny(fmt.Errorf("%w: %s (node %s)", ErrRevoked, info.Agent, info.Node))
	}
	if err := v.Policy.AllowFlow(info, c); err != nil {
		// The code is explicit: the policy's own error may wrap other sentinels.
		return denyAs(ReasonPolicy, fmt.Errorf("%w: %w", ErrPolicy, err))
	}
	minTrust, ok := v.MinTrust(s.Zone)
	if !ok {
		return Deny(fmt.Errorf("%w: zone %q is not in the policy", ErrZone, s.Zone))
	}
	if int(c.Trust) < minTrust {
		return Deny(fmt.Errorf("%w: %d < %d in zone %s", ErrTrust, c.Trust, minTrust, s.Zone))
	}
	if err := CheckFresh(c.IssuedAt, now, v.skew()); err != nil {
		return Deny(err)
	}
	if err := s.Replay.Check(c.Seq); err != nil {
		return Deny(err)
	}
	return nil
}

func (v *Verifier) ready(s *Session) error {
	switch {
	case v == nil || v.Chains == nil || v.Revocation == nil || v.Policy == nil || v.MinTrust == nil:
		return fmt.Errorf("%w: chain verifier, revocation checker, policy and min-trust lookup are all required", ErrConfig)
	case s == nil || s.Replay == nil || s.PeerNode == "" || s.Zone == "":
		return fmt.Errorf("%w: session needs peer node, zone and replay window", ErrConfig)
	}
	return checkAAD(s.AAD)
}

func (v *Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

func (v *Verifier) skew() time.Duration {
	if v.MaxSkew > 0 {
		return v.MaxSkew
	}
	return DefaultSkew
}

// resolveChain finds the record's chain and its verification, which it writes to info: inline
// chains are verified now; a hash is looked up in the session cache, whose entry is reused while
// the chain is unexpired (cached is then true).
func (v *Verifier) resolveChain(s *Session, c *Claims, now time.Time, info *AgentInfo) (chain CertChain, cached bool, err error) {
	if c.Chain != nil {
		chain = *c.Chain
	} else {
		if s.Chains == nil {
			return chain, false, fmt.Errorf("%w: send the full chain", ErrChainUnknown)
		}
		var h [HashLen]byte
		copy(h[:], c.ChainHash)
		e, ok := s.Chains.get(h)
		if !ok {
			return chain, false, fmt.Errorf("%w: send the full chain", ErrChainUnknown)
		}
		if !e.info.NotAfter.IsZero() && now.Before(e.info.NotAfter) {
			*info = e.info
			return e.chain, true, nil
		}
		chain = e.chain
	}
	verified, err := v.Chains.VerifyAgentChain(chain.Node, chain.Agent, now)
	if err != nil {
		return chain, false, denyAs(ReasonChain, fmt.Errorf("%w: %w", ErrChain, err))
	}
	if len(verified.AgentKey) != ed25519.PublicKeySize || verified.Agent == "" || verified.Node == "" {
		return chain, false, fmt.Errorf("%w: chain verifier returned no agent key or IDs", ErrConfig)
	}
	verified.ids = verified.buildRevocationIDs()
	verified.key, _ = voi.NewExpandedPublicKey(voi.PublicKey(verified.AgentKey))
	*info = verified
	return chain, false, nil
}

// admitStack is how much stack admission needs below Verifier.Admit: Ed25519 verification alone
// takes about 5 KiB of frames.
const admitStack = 6 << 10

// growStack makes the calling goroutine's stack hold admitStack more bytes now, while it is
// shallow. Admission may run on a new goroutine (overlay/tunnel reuses parked admission workers
// when it can, but starts one when none is free), whose small starting stack would otherwise be
// grown (copied, every frame's pointers adjusted) two or three times on the way down to Ed25519
// verification; one growth here, a few frames deep, costs a fraction of that (measured
// with valgrind: stack growth per admitted flow in node's BenchmarkDialAdmitted fell from about
// 108k to 50k instructions, BenchmarkAdmitNewGoroutine from 678k to 646k instructions per record;
// with overlay/tunnel's admission workers it is about 4k per flow).
//
//go:noinline
func growStack() {
	var pad [admitStack]byte
	touch(&pad)
}

//go:noinline
func touch(*[admitStack]byte) {}
