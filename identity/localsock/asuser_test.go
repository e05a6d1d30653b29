package localsock

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// nobody is the unprivileged uid/gid the attacker's process runs as.
const nobody = 65534

// envChild makes the test binary act as the attacker's process instead of running tests.
const envChild = "UTE_LOCALSOCK_CHILD"

func TestMain(m *testing.M) {
	if args := os.Getenv(envChild); args != "" {
		os.Exit(child(strings.Split(args, "\n")))
	}
	os.Exit(m.Run())
}

// child connects to the socket and reports what it saw; it reads until the server closes.
func child(args []string) int {
	if len(args) != 2 || args[0] != "connect" {
		fmt.Println("bad child args")
		return 2
	}
	c, err := net.DialTimeout("unix", args[1], 5*time.Second)
	if err != nil {
		fmt.Println("dial:", err)
		return 1
	}
	fmt.Println("connected")
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	b, _ := io.ReadAll(c)
	fmt.Printf("read %d bytes\n", len(b))
	return 0
}

// looseDir is a directory the unprivileged uid can traverse.
func looseDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ute-localsock-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	return dir
}

// runAs re-executes a copy of the test binary as uid (the build directory is not readable by
// other users) and returns its output.
func runAs(t *testing.T, uid uint32, args ...string) string {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err)
	bin := filepath.Join(looseDir(t), "child.test")
	data, err := os.ReadFile(self)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, data, 0o755))
	cmd := exec.Command(bin)
	cmd.Env = []string{envChild + "=" + strings.Join(args, "\n")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "child output: %s", out)
	return string(out)
}
