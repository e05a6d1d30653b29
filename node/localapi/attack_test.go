package localapi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// nobody is the unprivileged uid/gid the attacker's process runs as.
const nobody = 65534

// envChild makes the test binary act as the attacker's CLI instead of running tests.
const envChild = "UTE_LOCALAPI_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(envChild); path != "" {
		os.Exit(child(path))
	}
	os.Exit(m.Run())
}

// child tries every endpoint and prints one word per call: what errors.Is says about the error.
func child(path string) int {
	ctx := context.Background()
	c, err := Dial(ctx, path)
	if err != nil {
		if errors.Is(err, ErrForbidden) {
			fmt.Println("forbidden", err)
		} else {
			fmt.Println("dial:", err)
		}
		return 0
	}
	_, e1 := c.Status(ctx)
	_, e2 := c.Revoke(ctx, "spiffe://acme.internal/node/a", "attacker")
	_, e3 := c.AddAgent(ctx, AgentSpec{Name: "evil", Zone: "payments", Exe: "/bin/sh"})
	e4 := c.RemoveAgent(ctx, "payments", "billing")
	for _, e := range []error{e1, e2, e3, e4} {
		switch {
		case errors.Is(e, ErrForbidden):
			fmt.Println("forbidden", e)
		case e == nil:
			fmt.Println("ALLOWED")
		default:
			fmt.Println("other", e)
		}
	}
	return 0
}

// The attacker's side: a local user who is neither root nor the node directory's owner reaches
// the socket because its mode and directory were loosened by mistake. Every call is refused with
// ErrForbidden (a clear answer, not a reset) and none reaches the Backend.
func TestOtherUserIsForbidden(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs the attacker's client as uid 65534 (CI runs as root)")
	}
	dir := sockDir(t)
	require.NoError(t, os.Chmod(dir, 0o755))
	fb := &fakeBackend{}
	path := filepath.Join(dir, FileSocket)
	s, err := Start(path, fb, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, os.Chmod(path, 0o666)) // the misconfiguration

	self, err := os.Executable()
	require.NoError(t, err)
	data, err := os.ReadFile(self)
	require.NoError(t, err)
	bin := filepath.Join(dir, "child.test")
	require.NoError(t, os.WriteFile(bin, data, 0o755))
	cmd := exec.Command(bin)
	cmd.Env = []string{envChild + "=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "child: %s", out)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	require.Len(t, lines, 4, "%s", out)
	for _, l := range lines {
		assert.True(t, strings.HasPrefix(l, "forbidden "), l)
		assert.Contains(t, l, "uid 65534 may not use this socket")
	}
	assert.Zero(t, fb.calls.Load(), "the Backend never ran for the attacker")

	// With the directory as the daemon leaves it (0700), the kernel refuses the connect itself,
	// and the client still says "forbidden" rather than "no daemon is running".
	tight := filepath.Join(dir, "node")
	require.NoError(t, os.Mkdir(tight, 0o700))
	s2, err := Start(filepath.Join(tight, FileSocket), fb, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close() })
	cmd = exec.Command(bin)
	cmd.Env = []string{envChild + "=" + filepath.Join(tight, FileSocket)}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "child: %s", out)
	assert.True(t, strings.HasPrefix(string(out), "forbidden forbidden: no permission to reach "), "%s", out)
	assert.Zero(t, fb.calls.Load())

	// Root (this process) still gets through the same socket, which also shows the refusal was
	// about the caller and not a broken server.
	_, err = dial(t, path).Status(context.Background())
	require.NoError(t, err)
	assert.Equal(t, int64(1), fb.calls.Load())
}
