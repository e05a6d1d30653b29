package tunnel

// Tunnels returns a snapshot of every open tunnel, inbound and outbound. The daemon uses it to
// report tunnel state and to judge live tunnels against a new policy.
func (e *Endpoint) Tunnels() []*Tunnel {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]*Tunnel, 0, len(e.tunnels))
	for t := range e.tunnels {
		out = append(out, t)
	}
	return out
}

// Flows calls visit for every admitted inbound flow with its tunnel peer and admission. visit
// runs under the flow table's lock: it must not block or call back into the endpoint.
func (e *Endpoint) Flows(visit func(peer string, adm Admission)) {
	ft := e.table
	ft.mu.Lock()
	defer ft.mu.Unlock()
	for fe := range ft.flows {
		if fe.close != nil {
			visit(fe.peer, fe.adm)
		}
	}
}
