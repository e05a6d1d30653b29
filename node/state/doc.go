// Package state owns a node's directory on disk: its key and certificate, the authority
// certificate and bootstrap policy it received at join, its agents' keys and certificates, and the
// overlay IP allocations of those agents.
//
// It must never talk to the network and never hand an agent a certificate for a zone the node does
// not hold or an overlay IP outside the node's grant for that zone (the node's own slices of the
// zone's CIDRs, which the authority allocated to this node alone); every file holding a private key
// is 0600 in a 0700 directory.
package state
