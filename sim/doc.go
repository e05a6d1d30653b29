// Package sim is the UTE simulator: zone topologies and attack scenarios driven over real node code
// with an in-memory network for scale.
//
// It must never replace the code under test with a model of it: only the network is simulated.
package sim
