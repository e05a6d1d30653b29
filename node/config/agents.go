package config

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/goccy/go-yaml/ast"

	"github.com/ute-project/ute/identity"
)

// maxAgents bounds the agents list; maxForwards the forwards of one agent.
const (
	maxAgents   = 1024
	maxForwards = 64
)

// AgentProxy is one agent's settings under the proxy interface.
type AgentProxy struct {
	Name, Zone string
	// SOCKS and HTTP are loopback addresses for the agent's SOCKS5 and HTTP proxies; the zero
	// value means "127.0.0.1, a port the daemon picks" (shown in the daemon's log).
	SOCKS, HTTP netip.AddrPort
	// Forward maps the agent's overlay ports to local TCP servers, sorted by port.
	Forward []Forward
	// Attest checks every proxied connection's process against the agent's enrolled workload;
	// true unless the file says attest: false.
	Attest bool
	// ProxyProtocol makes the agent's forwards send a PROXY protocol v2 header naming the caller
	// (proxy_protocol: true); off by default, since a server that does not expect it breaks.
	ProxyProtocol bool
}

// Forward hands the agent's admitted inbound flows on Port to the loopback server Target.
type Forward struct {
	Port   uint16
	Target netip.AddrPort
}

// Equal compares two entries field by field.
func (a AgentProxy) Equal(b AgentProxy) bool {
	return a.Name == b.Name && a.Zone == b.Zone && a.SOCKS == b.SOCKS && a.HTTP == b.HTTP &&
		a.Attest == b.Attest && a.ProxyProtocol == b.ProxyProtocol && slices.Equal(a.Forward, b.Forward)
}

// Find returns the entry for name.zone.
func (c Config) Find(zone, name string) (AgentProxy, bool) {
	for _, a := range c.Agents {
		if a.Zone == zone && a.Name == name {
			return a, true
		}
	}
	return AgentProxy{}, false
}

func parseLoopback(s, what string) (netip.AddrPort, error) {
	ap, err := parseAddrPort(s, "127.0.0.1:1080")
	if err != nil {
		return ap, err
	}
	if !ap.Addr().IsLoopback() {
		return netip.AddrPort{}, valueError(ErrBadValue, "%q is reachable from other hosts; %s listens on loopback only (write 127.0.0.1:PORT)", s, what)
	}
	return ap, nil
}

func (w *walker) agents(e entry) ([]AgentProxy, error) {
	if _, null := e.val.(*ast.NullNode); null {
		return nil, nil
	}
	seq, ok := e.val.(*ast.SequenceNode)
	if !ok {
		return nil, w.err(e.at(), "agents", ErrBadValue, "expected a list of - name: NAME  zone: ZONE entries, got %s", kind(e.val))
	}
	if len(seq.Values) > maxAgents {
		return nil, w.err(seq, "agents", ErrTooLarge, "more than %d agents", maxAgents)
	}
	out := make([]AgentProxy, 0, len(seq.Values))
	seenAgent := map[string]bool{}
	seenAddr := map[netip.AddrPort]string{}
	for i, item := range seq.Values {
		field := fmt.Sprintf("agents[%d]", i)
		fs, err := w.fields(item, field, "name", "zone", "socks", "http", "forward", "attest", "proxy_protocol")
		if err != nil {
			return nil, err
		}
		a := AgentProxy{Attest: true}
		for _, f := range fs {
			sub := join(field, f.key)
			switch f.key {
			case "name", "zone":
				s, err := w.str(f, sub, "write a lowercase name")
				if err != nil {
					return nil, err
				}
				if err := identity.ValidateName(f.key, s); err != nil {
					return nil, w.err(f.at(), sub, ErrBadValue, "%v", err)
				}
				if f.key == "name" {
					a.Name = s
				} else {
					a.Zone = s
				}
			case "socks", "http":
				s, err := w.str(f, sub, "write a loopback address such as 127.0.0.1:1080")
				if err != nil {
					return nil, err
				}
				ap, err := parseLoopback(s, f.key+" proxy")
				if err != nil {
					return nil, w.wrap(f.at(), sub, err)
				}
				if ap.Port() != 0 {
					if other, dup := seenAddr[ap]; dup {
						return nil, w.err(f.at(), sub, ErrBadValue, "%s is already used by %s", ap, other)
					}
					seenAddr[ap] = sub
				}
				if f.key == "socks" {
					a.SOCKS = ap
				} else {
					a.HTTP = ap
				}
			case "attest", "proxy_protocol":
				b, ok := f.val.(*ast.BoolNode)
				if !ok {
					return nil, w.err(f.at(), sub, ErrBadValue, "expected true or false, got %s", kind(f.val))
				}
				if f.key == "attest" {
					a.Attest = b.Value
				} else {
					a.ProxyProtocol = b.Value
				}
			case "forward":
				if a.Forward, err = w.forwards(f, sub); err != nil {
					return nil, err
				}
			}
		}
		if a.Name == "" || a.Zone == "" {
			return nil, w.err(item, field, ErrBadValue, "every agent needs name and zone")
		}
		key := a.Name + "." + a.Zone
		if seenAgent[key] {
			return nil, w.err(item, field, ErrBadValue, "agent %s is listed twice", key)
		}
		seenAgent[key] = true
		out = append(out, a)
	}
	return out, nil
}

// forwards reads "PORT: 127.0.0.1:PORT" pairs.
func (w *walker) forwards(e entry, field string) ([]Forward, error) {
	if err := w.unsupported(e.val, field); err != nil {
		return nil, err
	}
	var pairs []*ast.MappingValueNode
	switch m := e.val.(type) {
	case *ast.MappingNode:
		pairs = m.Values
	case *ast.MappingValueNode:
		pairs = []*ast.MappingValueNode{m}
	default:
		return nil, w.err(e.at(), field, ErrBadValue, "expected a mapping of overlay port to local address such as 8080: 127.0.0.1:18080, got %s", kind(e.val))
	}
	if len(pairs) > maxForwards {
		return nil, w.err(e.at(), field, ErrTooLarge, "more than %d forwards", maxForwards)
	}
	out := make([]Forward, 0, len(pairs))
	for _, mv := range pairs {
		if err := w.unsupported(mv.Key, field); err != nil {
			return nil, err
		}
		var ps string
		switch k := mv.Key.(type) {
		case *ast.IntegerNode:
			ps = k.GetToken().Value
		case *ast.StringNode:
			ps = k.Value
		default:
			return nil, w.err(mv.Key, field, ErrBadValue, "keys are overlay ports 1..65535, got %s", kind(mv.Key))
		}
		port, err := strconv.ParseUint(ps, 10, 16)
		if err != nil || port == 0 {
			return nil, w.err(mv.Key, field, ErrBadValue, "%q is not a port 1..65535", ps)
		}
		sub := fmt.Sprintf("%s.%d", field, port)
		if slices.ContainsFunc(out, func(f Forward) bool { return f.Port == uint16(port) }) {
			return nil, w.err(mv.Key, sub, ErrBadValue, "port %d is forwarded twice", port)
		}
		if err := w.unsupported(mv.Value, sub); err != nil {
			return nil, err
		}
		s, err := w.str(entry{key: ps, kpos: mv.Key, val: mv.Value}, sub, "write the local server's address such as 127.0.0.1:18080")
		if err != nil {
			return nil, err
		}
		t, err := parseLoopback(s, "a forwarded flow's local server")
		if err != nil {
			return nil, w.wrap(mv.Value, sub, err)
		}
		if t.Port() == 0 {
			return nil, w.err(mv.Value, sub, ErrBadValue, "%q has no port; name the port the local server listens on", s)
		}
		out = append(out, Forward{Port: uint16(port), Target: t})
	}
	slices.SortFunc(out, func(a, b Forward) int { return int(a.Port) - int(b.Port) })
	return out, nil
}
