package trustflow

import (
	"slices"
	"time"
)

// Sighting is one place an identity is live now: a node ID and the underlay address of one of
// its live tunnels.
type Sighting struct {
	Subject string
	Addr    string
}

// Duplicate is an identity live at two or more addresses for at least the confirmation time.
type Duplicate struct {
	Subject string
	Addrs   []string
	Since   time.Time
}

// DuplicateDetector confirms that an identity is live at two places at once. A node that
// restarts on another port leaves a dead connection behind until its peers' idle timeout ends
// it, so a second address alone is not evidence: both must stay live for Confirm (default 45 s,
// longer than QUIC's 30 s idle timeout). A node that reconnects from the same address is one
// sighting. Not safe for concurrent use.
type DuplicateDetector struct {
	Confirm time.Duration
	first   map[string]time.Time
	done    map[string]bool
}

// Check takes every sighting live at time at and returns the identities newly confirmed as
// duplicates. Each is reported once until it is seen at a single address again.
func (d *DuplicateDetector) Check(at time.Time, live []Sighting) []Duplicate {
	if d.first == nil {
		d.first, d.done = map[string]time.Time{}, map[string]bool{}
	}
	confirm := d.Confirm
	if confirm <= 0 {
		confirm = 45 * time.Second
	}
	addrs := map[string][]string{}
	for _, s := range live {
		if s.Subject == "" || s.Addr == "" || slices.Contains(addrs[s.Subject], s.Addr) {
			continue
		}
		addrs[s.Subject] = append(addrs[s.Subject], s.Addr)
	}
	for id := range d.first {
		if len(addrs[id]) < 2 {
			delete(d.first, id)
			delete(d.done, id)
		}
	}
	var out []Duplicate
	ids := make([]string, 0, len(addrs))
	for id := range addrs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		as := addrs[id]
		if len(as) < 2 {
			continue
		}
		first, ok := d.first[id]
		if !ok {
			d.first[id] = at
			first = at
		}
		if !d.done[id] && at.Sub(first) >= confirm {
			d.done[id] = true
			slices.Sort(as)
			out = append(out, Duplicate{Subject: id, Addrs: as, Since: first})
		}
	}
	return out
}
