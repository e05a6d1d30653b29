// Package netlab builds a small multi-host network on one Linux machine for tests and benchmarks:
// N hosts as network namespaces, each with one veth (eth0) joined to a Linux bridge that lives in
// a namespace of its own, with addresses on one underlay subnet. It runs commands and long-running
// processes inside a host (`ip netns exec`), opens sockets inside a host from the calling Go
// process (setns on a locked thread), cuts, drops and restores a host's link, and removes every
// namespace, link and process it made when the test ends, also when the test fails or panics.
//
// Owns: the lab's namespaces, links and the processes started through it, and the sweep of
// leftovers of a crashed run (namespaces named with the prefix of a process that no longer exists).
//
// Must never: touch the root namespace's links, addresses or routes (nothing is created there:
// the bridge and every veth end live in the lab's namespaces, so deleting them deletes the links);
// remove a namespace that another live run created; run without root (New skips the test with a
// message instead).
package netlab
