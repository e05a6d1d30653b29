package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/overlay/audit"
)

// Workload attestation of SDK agents. An agent's certificate names its enrolled workload (the
// fingerprint digest of its executable, uid and gid: `ute agent add --exe`). The daemon's proxy
// and TUN interfaces attest the process that owns each connection's socket; an SDK agent runs in
// the process that embeds the node, so before any of its flows sends a byte, Agent.Dial checks
// that this process is that workload (attest.Attester.VerifySelf). A program that is not the
// enrolled executable (another tool run with the node directory, or the agent's binary replaced
// without re-enrolling) gets no flow, the refusal is audited, and the agent's trust is lowered
// (Config.OnWorkloadMismatch: TrustFlow's fingerprint_mismatch signal in the daemon).

// EventWorkloadRefused is the audit event of a flow refused because the program opening it is not
// the agent's enrolled workload: the daemon's interfaces write it about a socket's owner, the SDK
// about its own process (field via=sdk).
const EventWorkloadRefused = "workload-refused"

// ErrWorkloadMismatch is the refusal of a Dial from a process that is not the agent's enrolled
// workload, or of an agent whose certificate names no workload (nothing can match it). A real
// mismatch also wraps attest.ErrMismatch.
var ErrWorkloadMismatch = errors.New("node: this process is not the agent's enrolled workload")

// workloadRefusalKey makes two SDK workload refusals identical for the audit log's flood control:
// a program retrying in a loop writes its first refusal in full, then a counted summary.
var workloadRefusalKey = []string{"agent", "exe_sha256", "uid", "gid", "via"}

// attestSelf refuses a flow of a unless this process is a's enrolled workload. It runs before
// anything is resolved, signed or sent: name resolution itself may exchange the agent's records.
func (a *Agent) attestSelf(ctx context.Context, addr string) error {
	want := attest.Expected{Digest: a.creds().cert.Claims.Fingerprint}
	a.n.mu.Lock()
	if st := a.n.agents[agentKey{a.id.Zone, a.id.Name}]; st != nil {
		want.UID, want.GID, want.Exe = st.UID, st.GID, st.Exe
	}
	a.n.mu.Unlock()
	var p attest.Process
	var err error
	if len(want.Digest) == 0 {
		// Fail closed: a certificate without a fingerprint could not sign an admissible record
		// anyway (dtl refuses a record without one), and no process is its workload.
		err = fmt.Errorf("%w: the certificate of %s names no workload fingerprint", ErrWorkloadMismatch, a.id)
	} else if p, err = a.n.self.VerifySelf(want); errors.Is(err, attest.ErrMismatch) {
		err = fmt.Errorf("%w: %w", ErrWorkloadMismatch, err)
	}
	if err == nil {
		return nil
	}
	f := map[string]string{"agent": a.id.String(), "via": "sdk", "dst": addr, "error": err.Error()}
	if p.PID != 0 {
		f["pid"] = strconv.Itoa(p.PID)
		f["uid"] = strconv.FormatUint(uint64(p.Workload.UID), 10)
		f["gid"] = strconv.FormatUint(uint64(p.Workload.GID), 10)
		f["exe"] = p.Exe
		f["exe_sha256"] = hex.EncodeToString(p.Workload.ExeDigest[:])
	}
	for k, v := range f {
		f[k] = truncate(v)
	}
	if aerr := a.n.audit.Refuse(context.WithoutCancel(ctx), audit.Entry{Event: EventWorkloadRefused, Fields: f}, workloadRefusalKey...); aerr != nil {
		a.n.log.Error("audit append failed", "event", EventWorkloadRefused, "err", aerr)
	}
	a.n.log.Warn("flow refused by workload attestation", "agent", a.id.String(), "dst", addr, "err", err)
	// Only a process that is provably another workload is evidence against the agent; an
	// unreadable executable or a certificate without a fingerprint is refused but not charged.
	if errors.Is(err, attest.ErrMismatch) && a.n.cfg.OnWorkloadMismatch != nil {
		// Short, what tried first: trust events carry at most 200 bytes of reason.
		a.n.cfg.OnWorkloadMismatch(a.id, fmt.Sprintf("sdk: pid %d runs %s (sha256 %s, uid %d), not the enrolled %s (uid %d)",
			p.PID, p.Exe, hex.EncodeToString(p.Workload.ExeDigest[:8]), p.Workload.UID, want.Exe, want.UID))
	}
	return refused(addr, "attest", "workload", err)
}

// Relay is an agent's Dial for flows this process opens on behalf of another program: the
// daemon's proxy and TUN interfaces, which attest the program that owns each connection's socket
// before they dial (or not at all, for an agent configured with `attest: false`). It skips
// Agent.Dial's check of this process's own executable, and nothing else.
type Relay struct{ a *Agent }

// Relay returns the agent's Relay. The daemon's own process is never an agent's workload; a
// program that calls it gives up the SDK's workload check for those flows, which is the
// operator's choice like `attest: false`.
func (a *Agent) Relay() Relay { return Relay{a: a} }

// Dial is Agent.Dial without the own-process workload check.
func (r Relay) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return r.a.dialFrom(ctx, network, addr, false)
}

// ID is the agent's SPIFFE ID.
func (r Relay) ID() identity.ID { return r.a.id }
