// Package proxy is the node's interface for unmodified programs that cannot be root: per agent, a
// SOCKS5 proxy (RFC 1928, CONNECT, no authentication) and an HTTP proxy (CONNECT, and absolute-form
// http:// requests) on loopback, and a forwarder that hands the agent's admitted inbound flows to
// a local TCP port.
//
// Owns: the two request parsers (fuzzed), the loopback listeners, the attestation step run on
// every accepted connection before anything is dialed, the copy loops, and the forwarder's table
// from the local source address a forwarded connection comes from to the flow's verified
// provenance (so a local server can ask the local API who called it), and the optional PROXY
// protocol v2 header it can send first.
//
// It must never dial anything but through the agent (every outgoing connection is an SDK flow:
// signed record, admission, audit), never listen on a non-loopback address, never dial before
// the connecting process has been attested when attestation is configured, and never reply to a
// client with more than the refusal's class (the reason goes to the log and the callbacks).
package proxy
