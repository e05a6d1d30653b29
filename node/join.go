package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/zones"
)

// JoinParams is what Join needs to turn an empty directory into a joined node.
type JoinParams struct {
	Dir       string // node directory to create (0700)
	Authority string // authority UDP address host:port
	Token     string // join token
	Name      string // node name
	Region    string // region; "" lets the authority pick the token's only region
	// HostFingerprint overrides the host fingerprint digest; nil reads it from this host
	// (machine-id, region, running binary). Several in-process demo nodes set their own.
	HostFingerprint []byte
	// Advertise is the underlay address (host:port) the authority hands other members as this
	// node's bootstrap address; empty leaves it unknown.
	Advertise string
	Now       func() time.Time
}

// Join stages the node key in the node directory (creating it, 0700), joins the trust domain with
// the token and saves the result there.
//
// A join is retryable: the key is staged durably before the request is sent (state.JoinKey), and
// a Join into the same directory with the same token reuses it, so a join whose answer was lost
// after the authority issued the certificate collects that certificate on the retry. So a failed
// Join removes the staged key (and the directory, if this call created it) only when no
// certificate can have been issued for the key: the authority refused the token for good
// (authority.JoinRefused), or, for a key staged by this call, the request never left or was
// refused. Any other failure keeps both and says to run the same join again. A directory that
// holds a node certificate is refused (state.ErrAlreadyJoined).
func Join(ctx context.Context, p JoinParams) (d *state.Dir, err error) {
	tok, err := identity.ParseToken(p.Token)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", authority.ErrMalformedToken, err)
	}
	_, statErr := os.Stat(p.Dir)
	created := errors.Is(statErr, fs.ErrNotExist)
	// sd, not the named result: the deferred cleanup needs it after a failing return set d to nil.
	sd, err := state.Create(p.Dir)
	if err != nil {
		return nil, err
	}
	key, fresh, err := sd.JoinKey(tok.ID)
	if err != nil {
		if created {
			_ = os.RemoveAll(p.Dir)
		}
		return nil, err
	}
	// sent is set once the request may have reached the authority; until then a fresh key has
	// been shown to no one.
	sent := false
	defer func() {
		if err == nil {
			return
		}
		if (fresh && (!sent || !mayHaveCommitted(err))) || authority.JoinRefused(err) {
			if derr := sd.DiscardJoinKey(tok.ID); derr != nil {
				err = errors.Join(err, derr)
				return
			}
			if created {
				_ = os.RemoveAll(p.Dir)
			}
			return
		}
		err = fmt.Errorf("%w; the join may have completed at the authority, so its key stays staged in %s: run the same join again with the same token and --dir to collect the certificate",
			err, state.JoinKeyFile(p.Dir, tok.ID))
	}()
	fp := p.HostFingerprint
	if fp == nil {
		host, err := identity.ReadHostFingerprint(p.Region, "")
		if err != nil {
			return nil, fmt.Errorf("host fingerprint: %w", err)
		}
		dg := host.Digest()
		fp = dg[:]
	}
	sent = true
	j, err := authority.Join(ctx, authority.JoinParams{
		Addr: p.Authority, Token: p.Token, Key: key, Name: p.Name, Region: p.Region, HostFingerprint: fp, Now: p.Now, Advertise: p.Advertise,
	})
	if err != nil {
		return nil, err
	}
	// The policy is parsed (depth limit, strict schema) before it is stored: a node never keeps
	// a document it would refuse to run with.
	if _, err := zones.Parse("policy from the authority", j.Policy); err != nil {
		return nil, fmt.Errorf("the authority's policy does not parse: %w", err)
	}
	region := ""
	if len(j.Node.Claims.Regions) > 0 {
		region = j.Node.Claims.Regions[0]
	}
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	// The bootstrap members go first: SaveJoin writes node.crt last, which marks the directory
	// as joined, so nothing a joined directory needs is written after it.
	if err := SaveBootstrap(sd, j); err != nil {
		return nil, err
	}
	if err := sd.SaveJoin(state.Joined{
		Key: key, NodeCert: j.NodeCertDER, IssuerCert: j.IssuerCertDER, AuthorityCert: j.AuthorityDER, Policy: j.Policy,
		Info: state.Info{Name: p.Name, Region: region, TrustDomain: j.Node.ID.TrustDomain, Authority: p.Authority, JoinedAt: now().UTC()},
	}); err != nil {
		return nil, err
	}
	return state.Open(p.Dir, state.WithClock(now))
}

// mayHaveCommitted reports whether a join that failed with err, sent with a key no earlier
// attempt sent, may have been committed by the authority: the request may have reached it and no
// refusal came back (no answer after sending, a dropped connection, an answer this node could
// not use or save). A refusal means the authority's transaction did not commit; a pin mismatch
// means the peer was not the token's authority.
func mayHaveCommitted(err error) bool {
	var refusal *authority.RefusalError
	switch {
	case errors.As(err, &refusal), errors.Is(err, authority.ErrRequestNotSent), errors.Is(err, authority.ErrPinMismatch),
		errors.Is(err, authority.ErrAdvertise), errors.Is(err, authority.ErrCSR), errors.Is(err, authority.ErrMalformedToken):
		return false
	}
	return !authority.JoinRefused(err)
}

// SaveBootstrap keeps what a join or renewal returned besides the identity: the bootstrap members
// the daemon joins gossip through, and the signed policy release.
func SaveBootstrap(d *state.Dir, j *authority.Joined) error {
	ms := make([]state.Member, 0, len(j.Members))
	for _, m := range j.Members {
		ms = append(ms, state.Member{ID: m.ID, Addr: m.Addr, Zones: m.Zones})
	}
	return d.SaveBootstrap(ms, j.PolicyRelease)
}
