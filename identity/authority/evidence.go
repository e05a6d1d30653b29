package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// Duplicate-identity evidence: a member that sees one node identity live at two places at once
// sends the authority, over a connection authenticated by its own node certificate, the two
// presence proofs that identity signed for it (identity/record: one per tunnel, each naming a
// distinct process instance). The authority verifies them itself and, when they show two
// instances alive at once, revokes the identity with a sequenced record that reaches every node
// through the watch and gossip. Docs: docs/trustflow.md, "Duplicate identity: revocation on
// evidence"; the wire format: docs/protocol.md.

// OpEvidence opens a request carrying duplicate-identity evidence.
const OpEvidence byte = 4

// Evidence checks.
const (
	// EvidenceOverlap is how long each of the two instances must have been live after the other
	// started: a restarted node's new instance starts after its old one's last proof, so it never
	// qualifies, even with its clock off by less than this.
	EvidenceOverlap = time.Second
	// EvidenceMaxAge is how old the older proof may be: evidence is about a copy live now.
	EvidenceMaxAge = 10 * time.Minute
)

// ErrEvidence: the evidence does not prove a duplicate identity (the wrapped error says why:
// a proof that does not verify, proofs for another observer, one instance, no overlap, stale
// proofs, or a submitter that names itself).
var ErrEvidence = errors.New("duplicate-identity evidence refused")

// EvidenceRequest carries two presence proofs. Encoding: deterministic CBOR, integer keys.
type EvidenceRequest struct {
	A []byte `cbor:"1,keyasint"`
	B []byte `cbor:"2,keyasint"`
}

// DecodeEvidenceRequest strictly decodes an evidence request body.
func DecodeEvidenceRequest(b []byte) (EvidenceRequest, error) {
	var req EvidenceRequest
	if len(b) > maxRequest {
		return req, fmt.Errorf("%w: evidence request of %d bytes exceeds %d", ErrProtocol, len(b), maxRequest)
	}
	if err := wireDec.Unmarshal(b, &req); err != nil {
		return EvidenceRequest{}, fmt.Errorf("%w: evidence request: %w", ErrProtocol, err)
	}
	if len(req.A) == 0 || len(req.B) == 0 || len(req.A) > record.MaxPresenceSize || len(req.B) > record.MaxPresenceSize {
		return EvidenceRequest{}, fmt.Errorf("%w: evidence needs two presence proofs of at most %d bytes", ErrProtocol, record.MaxPresenceSize)
	}
	return req, nil
}

// VerifyEvidence checks duplicate-identity evidence that submitter (a node certificate, verified
// here) sends: both proofs verify up to the anchor, answer submitter's challenges, are fresh,
// are of one node other than submitter, and CheckDuplicate holds. It returns one of the proofs
// (the duplicated node's ID is its NodeID). Refusals wrap ErrEvidence, and identity/record's
// sentinel when a proof itself is refused.
func (a *Authority) VerifyEvidence(submitter *identity.Certificate, rawA, rawB []byte) (*record.Presence, error) {
	now := a.opts.Now()
	if err := (identity.Verifier{Authority: a.cert}).VerifyNode(submitter, now); err != nil {
		return nil, fmt.Errorf("%w: the submitter's certificate: %w", ErrEvidence, err)
	}
	v := record.Verifier{Certs: identity.Verifier{Authority: a.cert}}
	var ps [2]*record.Presence
	for i, raw := range [][]byte{rawA, rawB} {
		p, err := v.VerifyPresence(raw, now)
		if err != nil {
			return nil, fmt.Errorf("%w: proof %d: %w", ErrEvidence, i+1, err)
		}
		switch {
		case p.ObserverID != submitter.ID:
			return nil, fmt.Errorf("%w: proof %d answers %s, not the submitter %s", ErrEvidence, i+1, p.ObserverID, submitter.ID)
		case p.NodeID == submitter.ID:
			return nil, fmt.Errorf("%w: a node cannot report itself as duplicated", ErrEvidence)
		case now.Sub(p.Claims.SignedAt) > EvidenceMaxAge:
			return nil, fmt.Errorf("%w: proof %d was signed at %s, more than %s ago", ErrEvidence, i+1, p.Claims.SignedAt.UTC().Format(time.RFC3339), EvidenceMaxAge)
		}
		ps[i] = p
	}
	if err := record.CheckDuplicate(ps[0], ps[1], EvidenceOverlap); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrEvidence, err)
	}
	return ps[0], nil
}

// submitEvidence serves OpEvidence: verify, then revoke the duplicated node through the one
// revocation path (sequenced record, watchers notified), audited as event "evidence".
func (a *Authority) submitEvidence(ctx context.Context, req EvidenceRequest, certs []*x509.Certificate, p peer) Response {
	if len(certs) == 0 {
		return a.refuseNoise("evidence", p, "", fmt.Errorf("%w: no client certificate presented", ErrEvidence))
	}
	sub, err := identity.ParseCertificate(certs[0].Raw)
	if err != nil {
		return a.refuseNoise("evidence", p, "", fmt.Errorf("%w: %w", ErrEvidence, err))
	}
	if serial, ok := serialUint64(sub.Serial()); !ok {
		return a.refuse(ctx, "evidence", p, "", fmt.Errorf("%w: serial %s was never issued by this authority", ErrEvidence, sub.Serial()))
	} else if revoked, err := a.store.IsRevoked(serial); err != nil {
		return a.refuse(ctx, "evidence", p, "", err)
	} else if revoked {
		return a.refuse(ctx, "evidence", p, "", fmt.Errorf("%w: the submitter %s is revoked", ErrRevoked, sub.ID))
	}
	pr, err := a.VerifyEvidence(sub, req.A, req.B)
	if err != nil {
		return a.refuse(ctx, "evidence", p, "", err)
	}
	reason := fmt.Sprintf("duplicate identity: two instances live at once, seen by %s", sub.ID)
	rev, err := a.RevokeSubject(ctx, pr.NodeID.String(), reason)
	if err != nil {
		return a.refuse(ctx, "evidence", p, "", err)
	}
	a.audit(AuditRecord{Event: "evidence", Remote: p.remote, Subject: pr.NodeID.String(), Outcome: OutcomeRevoked, Reason: reason})
	a.log.Warn("duplicate identity revoked on evidence", "subject", pr.NodeID.String(), "observer", sub.ID.String(), "seq", rev.Seq)
	return Response{Code: CodeOK, Message: fmt.Sprintf("%s revoked (record %d)", pr.NodeID, rev.Seq), Head: rev.Seq}
}

// EvidenceParams are what SubmitEvidence needs: the authority's address and certificate (the
// pin), this node's certificate and key (mutual TLS), and the two presence proofs.
type EvidenceParams struct {
	Addr      string
	Authority *identity.Certificate
	Current   *identity.Certificate
	Key       ed25519.PrivateKey
	A, B      []byte
}

// SubmitEvidence sends duplicate-identity evidence to the authority. On success it returns the
// authority's sequence number of the revocation record; a refusal wraps ErrEvidence (or another
// sentinel of this package).
func SubmitEvidence(ctx context.Context, p EvidenceParams) (uint64, error) {
	if p.Authority == nil || p.Current == nil {
		return 0, errors.New("evidence: authority and current certificates are required")
	}
	tlsCert, err := identity.TLSCertificate(p.Key, p.Current)
	if err != nil {
		return 0, err
	}
	want := p.Authority.PublicKey()
	verify := func(cs tls.ConnectionState) error {
		pub, err := peerKey(cs)
		if err != nil {
			return err
		}
		if !pub.Equal(want) {
			return fmt.Errorf("%w: the server at %s presented key %s, not the authority key %s", ErrPinMismatch, p.Addr, identity.KeyHash(pub), identity.KeyHash(want))
		}
		return nil
	}
	resp, err := roundTrip(ctx, p.Addr, verify, &tlsCert, OpEvidence, EvidenceRequest{A: p.A, B: p.B})
	if err != nil {
		return 0, err
	}
	return resp.Head, nil
}
