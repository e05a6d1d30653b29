// Package trustflow is TrustFlow's engine: signals about a subject (an agent or node SPIFFE ID)
// go in, a trust score 0..100 per subject comes out, and every change is kept with its kind,
// weight, reason and time so that Explain can show the arithmetic behind a score.
//
// The package owns the scoring rules: the default weight of each signal kind and how a zone's
// tuning (the policy's trustflow block, through Tuning) overrides and caps it, the linear decay
// back to full trust, the ordering of signals by observation time (so that members folding the
// same gossiped events in any order compute the same score), the per-subject baselines of the
// destination-burst detector and the confirmation window of the duplicate-identity detector, and
// the mapping of a score onto a zone's thresholds (min_trust, isolate_below).
//
// It must never do I/O, read the wall clock (the clock is injected), start goroutines, or act on
// its own decisions: the node daemon feeds it events it has verified and carries out the actions
// (deny with reason "trust", isolate and revoke). Given the same signals at the same times it
// always computes the same scores.
package trustflow
