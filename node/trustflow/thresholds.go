package trustflow

import "github.com/ute-project/ute/zones"

// Thresholds are the scores at which TrustFlow acts on a subject.
type Thresholds struct {
	MinTrust     int // below: new flows from the subject are denied (reason "trust")
	IsolateBelow int // below: the subject is isolated and revoked
}

// ThresholdsOf is the strictest of the zones' thresholds: a node serving several zones is held
// to the most demanding one, since its flows in every zone depend on its integrity. No zone at
// all yields the strictest thresholds possible (fail closed).
func ThresholdsOf(zs ...*zones.Zone) Thresholds {
	if len(zs) == 0 {
		return Thresholds{MinTrust: 100, IsolateBelow: 100}
	}
	var t Thresholds
	for _, z := range zs {
		if z == nil {
			return Thresholds{MinTrust: 100, IsolateBelow: 100}
		}
		t.MinTrust = max(t.MinTrust, z.MinTrust)
		t.IsolateBelow = max(t.IsolateBelow, z.IsolateBelow)
	}
	return t
}

// Action is what a score calls for under t.
func (t Thresholds) Action(score int) zones.Action {
	switch {
	case score < t.IsolateBelow:
		return zones.ActionIsolateAndRevoke
	case score < t.MinTrust:
		return zones.ActionDenyFlows
	}
	return zones.ActionAllow
}
