package zones

import "fmt"

// Action is what TrustFlow must do to a subject.
type Action uint8

// Actions in increasing severity.
const (
	ActionAllow Action = iota
	ActionDenyFlows
	ActionIsolateAndRevoke
)

func (a Action) String() string {
	switch a {
	case ActionAllow:
		return "allow"
	case ActionDenyFlows:
		return "deny_flows"
	case ActionIsolateAndRevoke:
		return "isolate_and_revoke"
	default:
		return fmt.Sprintf("action(%d)", uint8(a))
	}
}

// MarshalText makes actions appear by name in JSON.
func (a Action) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// Drift carries the drift signals TrustFlow observed for a subject in one zone.
type Drift struct {
	// Region is where the subject runs now; "" when unknown.
	Region string
	// FingerprintChanged: the workload (agent) or host (node) fingerprint no longer matches the one
	// in the certificate.
	FingerprintChanged bool
	// LiveTwice: the same identity is live at two endpoints at once.
	LiveTwice bool
}

// TrustDecision is the outcome of TrustAction.
type TrustDecision struct {
	Action  Action
	Reason  Reason
	Message string
}

// TrustAction decides what happens to a subject of zone given its trust score and drift signals
// (invariant I6). Every finding is weighed and the most severe action wins:
//   - fingerprint changed or identity live twice: isolate and revoke, whatever the score, because
//     the key is being used by something other than the attested workload;
//   - score below isolate_below: isolate and revoke;
//   - score absent or invalid, region unknown or outside the placement, score below min_trust:
//     deny flows (missing data is never evidence enough to revoke, but never enough to allow);
//   - otherwise allow.
//
// An unknown zone or a nil policy denies flows.
func (p *Policy) TrustAction(zone string, score Score, d Drift) TrustDecision {
	if p == nil {
		return TrustDecision{ActionDenyFlows, ReasonNoPolicy, "no policy is loaded, so flows are denied"}
	}
	cz, ok := p.byName[zone]
	if !ok {
		return TrustDecision{ActionDenyFlows, ReasonUnknownZone, fmt.Sprintf("zone %q is not in the policy, so flows are denied", zone)}
	}
	z := cz.zone
	switch {
	case d.FingerprintChanged:
		return TrustDecision{ActionIsolateAndRevoke, ReasonFingerprintDrift,
			fmt.Sprintf("the fingerprint changed in zone %s: isolate and revoke", z.Name)}
	case d.LiveTwice:
		return TrustDecision{ActionIsolateAndRevoke, ReasonDuplicateIdentity,
			fmt.Sprintf("the identity is live at two places at once in zone %s: isolate and revoke", z.Name)}
	case score.Known && score.Value >= 0 && score.Value <= 100 && score.Value < z.IsolateBelow:
		return TrustDecision{ActionIsolateAndRevoke, ReasonTrustBelowIsolate,
			fmt.Sprintf("trust %d is below zone %s's isolation threshold %d: isolate and revoke", score.Value, z.Name, z.IsolateBelow)}
	case !score.Known:
		return TrustDecision{ActionDenyFlows, ReasonTrustUnknown,
			fmt.Sprintf("no trust score is known; zone %s needs %d, so flows are denied", z.Name, z.MinTrust)}
	case score.Value < 0 || score.Value > 100:
		return TrustDecision{ActionDenyFlows, ReasonTrustUnknown,
			fmt.Sprintf("trust score %d is outside 0..100, so flows are denied", score.Value)}
	case d.Region == "":
		return TrustDecision{ActionDenyFlows, ReasonRegionUnknown,
			fmt.Sprintf("the region is unknown, so it cannot be placed in zone %s; flows are denied", z.Name)}
	case !z.AllowsRegion(d.Region):
		return TrustDecision{ActionDenyFlows, ReasonRegionOutside,
			fmt.Sprintf("region %s is outside the placement of zone %s %v; flows are denied", d.Region, z.Name, z.Regions)}
	case score.Value < z.MinTrust:
		return TrustDecision{ActionDenyFlows, ReasonTrustBelowMin,
			fmt.Sprintf("trust %d is below zone %s's minimum %d; flows are denied", score.Value, z.Name, z.MinTrust)}
	}
	return TrustDecision{ActionAllow, ReasonAllowed,
		fmt.Sprintf("trust %d meets zone %s's minimum %d, inside the placement, no drift", score.Value, z.Name, z.MinTrust)}
}
