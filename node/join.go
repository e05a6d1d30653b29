package node

import (
	"context"
	"fmt"
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

// Join generates the node key, joins the trust domain with the token and saves the result in a
// new node directory. A failed join removes the directory it created.
func Join(ctx context.Context, p JoinParams) (d *state.Dir, err error) {
	_, statErr := os.Stat(p.Dir)
	d, err = state.Create(p.Dir)
	if err != nil {
		return nil, err
	}
	if os.IsNotExist(statErr) {
		defer func() {
			if err != nil {
				_ = os.RemoveAll(p.Dir)
			}
		}()
	}
	fp := p.HostFingerprint
	if fp == nil {
		host, err := identity.ReadHostFingerprint(p.Region, "")
		if err != nil {
			return nil, fmt.Errorf("host fingerprint: %w", err)
		}
		dg := host.Digest()
		fp = dg[:]
	}
	key, err := identity.GenerateKey()
	if err != nil {
		return nil, err
	}
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
	if err := d.SaveJoin(state.Joined{
		Key: key, NodeCert: j.NodeCertDER, IssuerCert: j.IssuerCertDER, AuthorityCert: j.AuthorityDER, Policy: j.Policy,
		Info: state.Info{Name: p.Name, Region: region, TrustDomain: j.Node.ID.TrustDomain, Authority: p.Authority, JoinedAt: now().UTC()},
	}); err != nil {
		return nil, err
	}
	if err := SaveBootstrap(d, j); err != nil {
		return nil, err
	}
	return state.Open(p.Dir, state.WithClock(now))
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
