package daemon

import (
	"encoding/hex"
	"fmt"
	"net/netip"

	"github.com/ute-project/ute/node/attest"
	"github.com/ute-project/ute/node/state"
)

// expectedWorkload is the enrolled workload an agent's flows are attested against.
func expectedWorkload(st *state.Agent) (attest.Expected, error) {
	digest, err := hex.DecodeString(st.Workload)
	if err != nil {
		return attest.Expected{}, fmt.Errorf("daemon: agent %s.%s: enrolled workload digest: %w", st.Name, st.Zone, err)
	}
	return attest.Expected{Digest: digest, UID: st.UID, GID: st.GID, Exe: st.Exe}, nil
}

// attestFlow checks that the process owning the socket client -> server (in the namespace the
// lookup runs in) is the agent's enrolled workload. A refusal is counted, audited and reported
// (workloadRefused) before the error is returned; the caller then drops the flow before any
// record is signed. The proxy interface and the TUN interface share it.
func (d *Daemon) attestFlow(att *attest.Attester, via, agent string, want attest.Expected, client, server netip.AddrPort) error {
	p, err := att.Verify(client, server, want)
	if err != nil {
		d.workloadRefusedVia(via, agent, client, p, err)
	}
	return err
}
