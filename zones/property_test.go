package zones

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path"
	"testing"

	"github.com/stretchr/testify/require"
)

// gen produces random but valid policies and agents from a fixed seed, drawing names and labels
// from small pools so that rules and agents collide often.
type gen struct{ rng *rand.Rand }

var (
	genNames   = []string{"a", "b", "ab", "a-1", "b-1", "billing-1", "billing-2", "ledger", "x"}
	genGlobs   = []string{"*", "a*", "b-*", "billing-*", "*-1", "a?", "[ab]*"}
	genRegions = []string{"r1", "r2", "r3"}
	genLabels  = []labelKV{{"team", "red"}, {"team", "blue"}, {"tier", "1"}, {"env", "prod"}}
)

func (g gen) selector() Selector {
	switch g.rng.IntN(3) {
	case 0:
		return Selector{Name: genNames[g.rng.IntN(len(genNames))]}
	case 1:
		return Selector{Glob: genGlobs[g.rng.IntN(len(genGlobs))]}
	default:
		m := map[string]string{}
		for range 1 + g.rng.IntN(2) {
			kv := genLabels[g.rng.IntN(len(genLabels))]
			m[kv.key] = kv.value
		}
		return Selector{Labels: m}
	}
}

func (g gen) portRange() PortRange {
	switch g.rng.IntN(6) {
	case 0:
		return PortRange{Proto: ProtoAny, Last: 65535}
	case 1:
		return PortRange{Proto: ProtoICMP}
	default:
		first := uint16(1 + g.rng.IntN(100))
		proto := ProtoTCP
		if g.rng.IntN(2) == 0 {
			proto = ProtoUDP
		}
		return PortRange{Proto: proto, First: first, Last: first + uint16(g.rng.IntN(10))}
	}
}

func (g gen) zones() []Zone {
	n := 1 + g.rng.IntN(3)
	zones := make([]Zone, n)
	for i := range zones {
		minTrust := g.rng.IntN(101)
		z := Zone{
			Name:         fmt.Sprintf("z%d", i),
			CIDRs:        []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16)},
			Regions:      genRegions[:1+g.rng.IntN(len(genRegions))],
			MinTrust:     minTrust,
			IsolateBelow: g.rng.IntN(minTrust + 1),
		}
		for range g.rng.IntN(12) {
			r := Rule{From: g.selector(), To: g.selector()}
			for range 1 + g.rng.IntN(3) {
				r.Ports = append(r.Ports, g.portRange())
			}
			z.Rules = append(z.Rules, r)
		}
		zones[i] = z
	}
	return zones
}

func (g gen) agent(zones []Zone) Agent {
	a := Agent{
		Name:    genNames[g.rng.IntN(len(genNames))],
		Zone:    zones[g.rng.IntN(len(zones))].Name,
		Region:  genRegions[g.rng.IntN(len(genRegions))],
		Trust:   Score{Value: g.rng.IntN(101), Known: g.rng.IntN(8) != 0},
		Revoked: g.rng.IntN(8) == 0,
		Labels:  map[string]string{},
	}
	for range g.rng.IntN(3) {
		kv := genLabels[g.rng.IntN(len(genLabels))]
		a.Labels[kv.key] = kv.value
	}
	if g.rng.IntN(20) == 0 {
		a.Region = ""
	}
	return a
}

func (g gen) flow() (uint16, Proto) {
	protos := []Proto{ProtoTCP, ProtoUDP, ProtoICMP}
	proto := protos[g.rng.IntN(len(protos))]
	if proto == ProtoICMP {
		return 0, proto
	}
	return uint16(1 + g.rng.IntN(115)), proto
}

// naiveAllows is the specification of a flow written as plainly as possible: a linear scan with
// path.Match and direct label lookups. The compiled evaluator must agree with it exactly.
func naiveAllows(zones []Zone, src, dst Agent, port uint16, proto Proto) bool {
	if src.Name == "" || dst.Name == "" || src.Revoked || dst.Revoked || src.Zone != dst.Zone {
		return false
	}
	var z *Zone
	for i := range zones {
		if zones[i].Name == src.Zone {
			z = &zones[i]
		}
	}
	if z == nil || !z.AllowsRegion(src.Region) || !src.Trust.Known || src.Trust.Value < z.MinTrust {
		return false
	}
	if (proto == ProtoTCP || proto == ProtoUDP) && port == 0 {
		return false
	}
	sel := func(s Selector, a Agent) bool {
		switch {
		case s.Name != "":
			return s.Name == a.Name
		case s.Glob != "":
			ok, _ := path.Match(s.Glob, a.Name)
			return ok
		}
		for k, v := range s.Labels {
			if a.Labels[k] != v {
				return false
			}
		}
		return true
	}
	for _, r := range z.Rules {
		if !sel(r.From, src) || !sel(r.To, dst) {
			continue
		}
		for _, pr := range r.Ports {
			if pr.Contains(proto, port) {
				return true
			}
		}
	}
	return false
}

const propertyIterations = 3000

func TestPropertyFlowMatchesSpecification(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(1, 2))}
	allowed := 0
	for range propertyIterations {
		zones := g.zones()
		p, err := New(zones)
		require.NoError(t, err)
		for range 20 {
			src, dst := g.agent(zones), g.agent(zones)
			port, proto := g.flow()
			d := p.Flow(src, dst, port, proto)
			require.Equal(t, naiveAllows(zones, src, dst, port, proto), d.Allow, "%+v -> %+v %s/%d: %s", src, dst, proto, port, d.Message)
			if d.Allow {
				allowed++
			}
		}
	}
	// The generator must exercise the allow path, or the agreement above proves little.
	require.Greater(t, allowed, propertyIterations/10)
}

func TestPropertyNoCrossZoneFlow(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(3, 4))}
	for range propertyIterations {
		zones := g.zones()
		p, err := New(zones)
		require.NoError(t, err)
		for range 20 {
			src, dst := g.agent(zones), g.agent(zones)
			if src.Zone == dst.Zone {
				dst.Zone += "-other"
			}
			src.Revoked, dst.Revoked = false, false
			port, proto := g.flow()
			d := p.Flow(src, dst, port, proto)
			require.False(t, d.Allow, d.Message)
			require.Equal(t, ReasonCrossZone, d.Reason)
		}
	}
}

func TestPropertyRemovingRuleNeverAllowsMore(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(5, 6))}
	for range propertyIterations {
		zones := g.zones()
		full, err := New(zones)
		require.NoError(t, err)
		zi := g.rng.IntN(len(zones))
		if len(zones[zi].Rules) == 0 {
			continue
		}
		ri := g.rng.IntN(len(zones[zi].Rules))
		fewer := make([]Zone, len(zones))
		copy(fewer, zones)
		fewer[zi].Rules = append(append([]Rule{}, zones[zi].Rules[:ri]...), zones[zi].Rules[ri+1:]...)
		reduced, err := New(fewer)
		require.NoError(t, err)
		for range 30 {
			src, dst := g.agent(zones), g.agent(zones)
			port, proto := g.flow()
			if reduced.Flow(src, dst, port, proto).Allow {
				require.True(t, full.Flow(src, dst, port, proto).Allow, "removing a rule allowed %+v -> %+v", src, dst)
			}
		}
	}
}

func TestPropertyRevokedNeverAllowed(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(7, 8))}
	for range propertyIterations {
		zones := g.zones()
		p, err := New(zones)
		require.NoError(t, err)
		for range 20 {
			src, dst := g.agent(zones), g.agent(zones)
			dst.Zone = src.Zone
			if g.rng.IntN(2) == 0 {
				src.Revoked = true
			} else {
				dst.Revoked = true
			}
			port, proto := g.flow()
			d := p.Flow(src, dst, port, proto)
			require.False(t, d.Allow)
			if src.Name != "" && dst.Name != "" {
				require.Equal(t, ReasonRevoked, d.Reason)
			}
			z := zones[g.rng.IntN(len(zones))]
			a := Node{Name: "n1", Zones: []string{z.Name}, Region: z.Regions[0]}
			b := Node{Name: "n2", Zones: []string{z.Name}, Region: z.Regions[0], Revoked: true}
			require.Equal(t, ReasonRevoked, p.Tunnel(z.Name, a, b).Reason)
			require.Equal(t, ReasonRevoked, p.Tunnel(z.Name, b, a).Reason)
			require.True(t, p.Tunnel(z.Name, a, a).Allow, "the unrevoked control case must pass")
		}
	}
}
