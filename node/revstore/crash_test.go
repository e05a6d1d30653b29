package revstore

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

// crashChildEnv makes the test binary act as a node process that adds revocations until killed.
const crashChildEnv = "UTE_REVSTORE_CRASH_CHILD"

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		if err := crashChild(dir); err != nil {
			fmt.Fprintln(os.Stderr, "crash child:", err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// crashChild opens the store in dir and adds every record of dir/records.cbor, printing each key
// only after Add returned changed=true (the durability promise the parent checks), then waits to
// be killed.
func crashChild(dir string) error {
	anchorDER, err := os.ReadFile(filepath.Join(dir, "anchor.der"))
	if err != nil {
		return err
	}
	anchor, err := identity.ParseCertificate(anchorDER)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(dir, "records.cbor"))
	if err != nil {
		return err
	}
	var raws [][]byte
	if err := cbor.Unmarshal(b, &raws); err != nil {
		return err
	}
	s, _, err := Open(filepath.Join(dir, FileName), Options{
		Verifier: record.Verifier{Certs: identity.Verifier{Authority: anchor}},
		Now:      func() time.Time { return t0 },
	})
	if err != nil {
		return err
	}
	for _, raw := range raws {
		r, changed, err := s.Add(raw)
		if err != nil {
			return err
		}
		if changed {
			if _, err := fmt.Fprintf(os.Stdout, "added %s\n", r.Key()); err != nil {
				return err
			}
		}
	}
	fmt.Fprintln(os.Stdout, "done")
	time.Sleep(time.Minute) // the parent kills us first
	return nil
}

// TestAcceptedRevocationsSurviveSIGKILL kills a process that is adding revocations with SIGKILL
// at several points, and checks after each that every revocation it acknowledged is in force as
// soon as the store reopens.
func TestAcceptedRevocationsSurviveSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	p := newPKI(t)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "anchor.der"), p.auth.Raw(), 0o600))
	const total = 400
	raws := make([][]byte, total)
	for i := range raws {
		raws[i] = p.byAuthority(t, serial(i+1), uint64(i+1), time.Hour)
	}
	b, err := cbor.Marshal(raws)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "records.cbor"), b, 0o600))

	acked := map[string]bool{}
	for round, killAfter := range []int{1, 40, 90} {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		sc := bufio.NewScanner(out)
		seen, killed := 0, false
		for sc.Scan() {
			line := sc.Text()
			if key, ok := strings.CutPrefix(line, "added "); ok {
				acked[key] = true
				seen++
			}
			if !killed && (seen >= killAfter || line == "done") {
				require.NoError(t, cmd.Process.Kill()) // SIGKILL: no Close, no deferred anything
				killed = true
			}
		}
		_ = cmd.Wait()
		require.True(t, killed, "round %d: child ended before it was killed: %s", round, stderr.String())

		clk := &clock{t: t0}
		s, rep, err := Open(filepath.Join(dir, FileName), Options{Verifier: p.v, Now: clk.Now})
		require.NoError(t, err, "round %d", round)
		assert.Empty(t, rep.Quarantined)
		missing := 0
		for k := range acked {
			if !s.Revoked(k) {
				missing++
			}
		}
		assert.Zero(t, missing, "round %d: %d acknowledged revocations lost", round, missing)
		assert.GreaterOrEqual(t, rep.Loaded, len(acked))
		t.Logf("round %d: killed after %d acknowledgements; %d acknowledged so far, %d held after restart", round, seen, len(acked), rep.Loaded)
		require.NoError(t, s.Close())
	}
}
