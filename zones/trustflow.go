package zones

import (
	"fmt"
	"slices"

	"github.com/goccy/go-yaml/ast"
)

// TrustSignals are the TrustFlow signal kinds a zone's trustflow block may weigh, in the order
// docs/trustflow.md lists them. node/trustflow's kinds are the same names (its tests check).
var trustSignals = []string{
	"region_drift", "fingerprint_mismatch", "duplicate_identity", "signer_mismatch",
	"policy_denial", "destination_burst", "renewal_failure", "expiring_certificate",
}

// TrustSignals lists the signal kinds a trustflow block may weigh (a fresh slice each call).
func TrustSignals() []string { return slices.Clone(trustSignals) }

// MaxDecayPerHour bounds a zone's decay: 100 points a minute would make every penalty vanish
// before its peers could act on it.
const MaxDecayPerHour = 6000

// TrustFlow is a zone's tuning of TrustFlow (the trustflow: block); the thresholds are the zone's
// min_trust and isolate_below. A nil *TrustFlow (no block) means the engine's defaults.
type TrustFlow struct {
	// Weights override the default weight of a signal kind (0..100) for subjects of this zone.
	Weights map[string]int
	// DecayPerHour is how many points a penalty loses per hour (1..MaxDecayPerHour); 0 keeps the
	// default.
	DecayPerHour int
	// Line is the line of the block in its policy file (0 when built with New).
	Line int
}

// trustflow reads a zone's trustflow: block, refusing unknown keys and signal names.
func (w *walker) trustflow(mv *ast.MappingValueNode, field string) (*TrustFlow, error) {
	f, err := w.fields(mv.Value, field, "weights", "decay_per_hour")
	if err != nil {
		return nil, err
	}
	tf := &TrustFlow{Line: posOf(mv.Key).line}
	if d, ok := f["decay_per_hour"]; ok {
		sub := field + ".decay_per_hour"
		in, isInt := d.Value.(*ast.IntegerNode)
		if !isInt {
			return nil, w.err(d.Value, sub, ErrBadValue, "expected an integer 1..%d (points per hour), got %s", MaxDecayPerHour, kind(d.Value))
		}
		v, ok := intValue(in)
		if !ok || v < 1 || v > MaxDecayPerHour {
			return nil, w.err(d.Value, sub, ErrBadValue, "%v is outside 1..%d points per hour", in.Value, MaxDecayPerHour)
		}
		tf.DecayPerHour = v
	}
	if ws, ok := f["weights"]; ok {
		sub := field + ".weights"
		wf, err := w.fields(ws.Value, sub, trustSignals...)
		if err != nil {
			return nil, err
		}
		tf.Weights = make(map[string]int, len(wf))
		for name, kv := range wf {
			in, isInt := kv.Value.(*ast.IntegerNode)
			if !isInt {
				return nil, w.err(kv.Value, sub+"."+name, ErrBadValue, "expected a weight 0..100, got %s", kind(kv.Value))
			}
			v, ok := intValue(in)
			if !ok || v < 0 || v > 100 {
				return nil, w.err(kv.Value, sub+"."+name, ErrBadValue, "%v is outside 0..100", in.Value)
			}
			tf.Weights[name] = v
		}
	}
	return tf, nil
}

func intValue(in *ast.IntegerNode) (int, bool) {
	switch v := in.Value.(type) {
	case int64:
		if v >= -1<<31 && v < 1<<31 {
			return int(v), true
		}
	case uint64:
		if v < 1<<31 {
			return int(v), true
		}
	}
	return 0, false
}

// checkTrustFlow validates a block built with New (Parse checks as it reads).
func checkTrustFlow(tf *TrustFlow) error {
	if tf == nil {
		return nil
	}
	if tf.DecayPerHour < 0 || tf.DecayPerHour > MaxDecayPerHour {
		return fmt.Errorf("%w: decay_per_hour %d is outside 1..%d", ErrBadValue, tf.DecayPerHour, MaxDecayPerHour)
	}
	for k, v := range tf.Weights {
		if !slices.Contains(trustSignals, k) {
			return fmt.Errorf("%w: %q is not a signal; allowed: %v", ErrUnknownField, k, trustSignals)
		}
		if v < 0 || v > 100 {
			return fmt.Errorf("%w: weight of %s is %d, outside 0..100", ErrBadValue, k, v)
		}
	}
	return nil
}
