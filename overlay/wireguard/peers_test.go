package wireguard

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func mkBinding(node string, key Key, at time.Time, zones ...string) *Binding {
	return &Binding{Node: "spiffe://acme.internal/node/" + node, Zones: zones, Key: key,
		Endpoint: netip.MustParseAddrPort("192.0.2.9:7445"), IssuedAt: at, Expires: at.Add(time.Hour)}
}

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range s {
		out = append(out, netip.MustParsePrefix(a))
	}
	return out
}

func TestComputePeers(t *testing.T) {
	self, k2, k3, k4, k5 := mustKeyPair(t), mustKeyPair(t), mustKeyPair(t), mustKeyPair(t), mustKeyPair(t)
	pay := prefixes("100.100.1.16/28")
	members := []Member{
		// n2: two agents in its slice, one outside it (a forged directory entry): not allowed.
		{Zone: "payments", Binding: mkBinding("n2", k2.Public, t0, "payments"), Prefixes: pay,
			Agents: addrs("100.100.1.18", "100.100.1.17", "100.100.1.40", "100.100.1.19")},
		// n2 again in support with a newer binding (restarted: new key): the newest key wins and
		// the allowed IPs are the union over the zones both serve.
		{Zone: "support", Binding: mkBinding("n2", k3.Public, t0.Add(time.Minute), "support"),
			Prefixes: prefixes("100.100.2.16/28"), Agents: addrs("100.100.2.17")},
		// n3: only in a zone this node does not serve.
		{Zone: "ops", Binding: mkBinding("n3", k4.Public, t0, "ops"), Prefixes: prefixes("100.100.3.0/28"), Agents: addrs("100.100.3.1")},
		// n4: revoked.
		{Zone: "payments", Binding: mkBinding("n4", k5.Public, t0, "payments"), Prefixes: prefixes("100.100.1.32/28")},
		// n5: presents this node's own key.
		{Zone: "payments", Binding: mkBinding("n5", self.Public, t0, "payments")},
		// n6: a binding for support on the payments member: ignored.
		{Zone: "payments", Binding: mkBinding("n6", k4.Public, t0, "support")},
	}
	specs, conflicts := ComputePeers(self.Public, []string{"payments", "support"}, members, Exclude{
		Node: func(n string) bool { return n == "spiffe://acme.internal/node/n4" },
		// An agent of n2 revoked: its address is no allowed IP, the node's others still are.
		Agent: func(n string, a netip.Addr) bool {
			return n == "spiffe://acme.internal/node/n2" && a == netip.MustParseAddr("100.100.1.19")
		},
	})
	require.Empty(t, conflicts)
	require.Len(t, specs, 1)
	require.Equal(t, "spiffe://acme.internal/node/n2", specs[0].Node)
	require.Equal(t, k3.Public, specs[0].Key)
	require.Equal(t, prefixes("100.100.1.17/32", "100.100.1.18/32", "100.100.2.17/32"), specs[0].AllowedIPs)
}

func TestComputePeersKeyConflictConfiguresNeither(t *testing.T) {
	self, k := mustKeyPair(t), mustKeyPair(t)
	members := []Member{
		{Zone: "payments", Binding: mkBinding("n2", k.Public, t0, "payments")},
		{Zone: "payments", Binding: mkBinding("n3", k.Public, t0, "payments")},
	}
	specs, conflicts := ComputePeers(self.Public, []string{"payments"}, members, Exclude{})
	require.Empty(t, specs)
	require.Len(t, conflicts, 1)
	require.Equal(t, []string{"spiffe://acme.internal/node/n2", "spiffe://acme.internal/node/n3"}, conflicts[0].Nodes)
}
