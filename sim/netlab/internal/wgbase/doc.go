// Command wgbase is the benchmark baseline "bare wireguard-go": one kernel TUN device driven by an
// unmodified wireguard-go device with one peer, configured through IpcSet, in the network
// namespace it is started in (`ip netns exec NS wgbase ...`). It prints "ready" once the device
// is up with its address, and removes the device when it gets SIGTERM or SIGINT.
//
// Owns: nothing but its own device. It must never be used outside benchmarks and tests: its keys
// come on the command line.
package main
