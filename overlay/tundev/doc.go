// Package tundev owns the life of the node's kernel TUN interface (default "ute0"): it creates the
// device with wireguard-go's tun.CreateTUN, assigns the local agents' overlay addresses, brings
// the link up, routes the node's zone CIDRs into it, and removes all of that again on Close or,
// for a leftover from an earlier run, on Cleanup. It speaks rtnetlink itself (no `ip` process).
//
// It must never touch an interface it did not create or that is still in use: Cleanup removes
// only a TUN device that no process holds open, and refuses any other kind of link with that
// name. It must never read or write packets: the carriage (overlay/tunstack) does that through
// Device.TUN. Every netlink request goes through a socket opened by Open, so a Device keeps
// acting on the network namespace it was created in, whichever thread calls it later.
package tundev
