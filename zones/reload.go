package zones

// LiveTunnel is a tunnel that exists now: two nodes and the one zone it carries.
type LiveTunnel struct {
	Zone string
	A, B Node
}

// LiveFlow is a flow that exists now.
type LiveFlow struct {
	Src, Dst Agent
	Port     uint16
	Proto    Proto
}

// TunnelTeardown names a live tunnel the new policy no longer allows.
type TunnelTeardown struct {
	Index    int // position in the tunnels given to Reload
	Tunnel   LiveTunnel
	Decision Decision // the new policy's denial: why it must go
	// WasAllowed reports whether the old policy allowed it, i.e. whether the reload itself is
	// the cause (false means it should not have been up in the first place).
	WasAllowed bool
}

// FlowTeardown names a live flow the new policy no longer allows.
type FlowTeardown struct {
	Index      int
	Flow       LiveFlow
	Decision   Decision
	WasAllowed bool
}

// ReloadPlan lists what a policy reload must tear down, in the order given.
type ReloadPlan struct {
	Tunnels []TunnelTeardown
	Flows   []FlowTeardown
}

// Empty reports whether nothing must be torn down.
func (r ReloadPlan) Empty() bool { return len(r.Tunnels) == 0 && len(r.Flows) == 0 }

// Reload judges every live tunnel and flow against the new policy and returns those it denies.
// Everything is re-decided rather than diffed rule by rule, so the plan can never keep alive
// something the new policy would refuse to open; old (which may be nil) only explains whether the
// reload is the cause. A nil next policy tears everything down (fail closed).
func Reload(old, next *Policy, tunnels []LiveTunnel, flows []LiveFlow) ReloadPlan {
	var plan ReloadPlan
	for i, t := range tunnels {
		d := next.Tunnel(t.Zone, t.A, t.B)
		if d.Allow {
			continue
		}
		plan.Tunnels = append(plan.Tunnels, TunnelTeardown{
			Index: i, Tunnel: t, Decision: d,
			WasAllowed: old != nil && old.Tunnel(t.Zone, t.A, t.B).Allow,
		})
	}
	for i, f := range flows {
		d := next.Flow(f.Src, f.Dst, f.Port, f.Proto)
		if d.Allow {
			continue
		}
		plan.Flows = append(plan.Flows, FlowTeardown{
			Index: i, Flow: f, Decision: d,
			WasAllowed: old != nil && old.Flow(f.Src, f.Dst, f.Port, f.Proto).Allow,
		})
	}
	return plan
}
