package node

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/node/state"
	"github.com/ute-project/ute/overlay/dtl"
)

// A node that presents its issuing certificate (with the issuing key, which it holds) as its TLS
// certificate is refused at the handshake: the issuing certificate is a CA and never a leaf.
func TestIssuingCertificateIsNeverATunnelLeaf(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}},
		nodeSpec{name: "b", zones: []string{"payments"}},
	)
	a, b := ns["a"], ns["b"]
	iss, issKey := nodeIssuer(t, a)
	tc, err := identity.TLSCertificate(issKey, iss)
	require.NoError(t, err)
	require.NoError(t, a.ep.SetCertificate(tc))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = a.tunnelTo(ctx, b.ID().String(), "payments")
	require.Error(t, err, "b must refuse a handshake with a's issuing certificate")

	var refused map[string]string
	require.Eventually(t, func() bool {
		for _, r := range auditEntries(t, b) {
			if r.Event == eventTunnelRefused {
				refused = r.Fields
				return true
			}
		}
		return false
	}, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, "chain", refused["reason"])
	assert.Contains(t, refused["error"], identity.ErrLeafIsCA.Error())
}

// Node a holds its own issuing key and the zone payments; b's issuing certificate is public (it
// travels in every record of b's agents). Nothing a can build with them passes as an agent of b.
func TestAgentOfOneNodeCannotPassAsAnotherNodes(t *testing.T) {
	ns := cluster(t,
		nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}},
		nodeSpec{name: "b", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "ledger", Zone: "payments"}}},
	)
	a, b := ns["a"], ns["b"]
	serveSink(t, agent(t, b, "payments", "ledger"), "8080")
	issA, issAKey := nodeIssuer(t, a)
	issB, _ := nodeIssuer(t, b)
	gB, ok := issB.Claims.Zone("payments")
	require.True(t, ok)
	gA, ok := issA.Claims.Zone("payments")
	require.True(t, ok)
	inB := gB.Prefixes[0].Addr().Next().Next().Next()
	inA := gA.Prefixes[0].Addr().Next().Next().Next()

	ab, err := a.tunnelTo(context.Background(), b.ID().String(), "payments")
	require.NoError(t, err)

	send := func(t *testing.T, chainNode *identity.Certificate, ip netip.Addr, claimNode string) error {
		forged, key := forgeAgent(t, issA, issAKey, "payments", "impostor", ip)
		rec, err := dtl.Sign(&dtl.Claims{
			Zone: "payments", Agent: forged.ID.String(), Chain: &dtl.CertChain{Node: chainNode.Raw(), Agent: forged.Raw()},
			Node: claimNode, Fingerprint: forged.Claims.Fingerprint, Region: "eu-west-1", Trust: 100,
			Destination: toLedger, FlowID: ab.NewFlowID(), Seq: 1 << 40, IssuedAt: time.Now(),
		}, key, ab.Exporter())
		require.NoError(t, err)
		return open(t, ab, rec)
	}

	t.Run("chained to b's issuing certificate", func(t *testing.T) {
		err := send(t, issB, inB, b.ID().String())
		require.ErrorIs(t, err, dtl.ErrChain)
		assert.Contains(t, err.Error(), "signature")
	})
	t.Run("chained to a's, with an address of b's slice", func(t *testing.T) {
		err := send(t, issA, inB, b.ID().String())
		require.ErrorIs(t, err, dtl.ErrChain)
		assert.Contains(t, err.Error(), identity.ErrCIDRConstraint.Error())
	})
	t.Run("a valid agent of a whose record claims node b", func(t *testing.T) {
		err := send(t, issA, inA, b.ID().String())
		require.ErrorIs(t, err, dtl.ErrClaimMismatch)
	})
	t.Run("a's node certificate in the issuer's place", func(t *testing.T) {
		err := send(t, a.Certificate(), inA, a.ID().String())
		require.ErrorIs(t, err, dtl.ErrChain)
		assert.Contains(t, err.Error(), identity.ErrNotCA.Error())
	})
	// Identical refusals collapse into one entry with a count; both kinds were audited.
	assert.Subset(t, denials(t, b), []string{"chain", "claim-mismatch"})
}

// Admission attributes an agent to the node its issuing CA names, with that node certificate's
// serial: a revocation of the node by serial reaches its agents through their issuing CA.
func TestAgentChainCarriesItsNodesSerial(t *testing.T) {
	ns := cluster(t, nodeSpec{name: "a", zones: []string{"payments"}, agents: []state.AgentSpec{{Name: "billing-api", Zone: "payments"}}})
	a := ns["a"]
	billing := agent(t, a, "payments", "billing-api")
	cr := billing.creds()
	require.True(t, cr.node.Issuing, "records carry the issuing CA, not the node certificate")
	info, err := a.verifyAgentChain(cr.node.Raw(), cr.cert.Raw(), time.Now())
	require.NoError(t, err)
	assert.Equal(t, a.ID().String(), info.Node)
	assert.Equal(t, serialKey(a.Certificate()), info.NodeSerial)
	assert.Contains(t, info.RevocationIDs(), serialKey(a.Certificate()))
	assert.NotContains(t, info.RevocationIDs(), "serial:"+cr.node.Serial().String(), "the issuing CA's own serial names nothing")
}
