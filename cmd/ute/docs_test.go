package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Documentation blocks marked runnable are executed, so that the commands a newcomer copies
// keep working. The marker is an HTML comment on the line right before the fence; GitHub does not
// render it, and it needs no fence info-string extension:
//
//	<!-- runnable -->
//	```sh
//	bin/ute ...
//	```
//
// A shell block runs under `bash -e` in a temporary directory (holding a link to the repository's
// docs/, so relative paths like docs/examples/policy.yaml resolve), after these rewrites:
//   - `bin/ute` becomes the binary TestMain built, and `make build` a no-op;
//   - /tmp/ute becomes a fresh t.TempDir();
//   - every loopback port (127.0.0.1:N) becomes a free port, the same N always the same port;
//   - a command ending in `# expect failure` must fail; if the next line is a comment showing the
//     output ("#   ute: ..."), its text up to the first "…" must appear in the command's output;
//   - after a command put in the background with `&` whose --listen is a loopback port, the
//     script waits until that UDP port is bound, as a human would wait for the daemon to start.
//
// Every process the block starts is in one process group, killed when the block ends.
//
// A Go block must be a whole program (package main); it is compiled against this module, not run.
// The quick start runs in a few seconds, so it also runs under -short (make check): drift in
// the first commands a newcomer types is caught in the inner loop.
const (
	docsMarker     = "<!-- runnable -->"
	expectFailure  = "# expect failure"
	blockTimeout   = 3 * time.Minute
	listenWaitSecs = 20
)

type docBlock struct {
	file string // relative to the repository root
	line int    // of the opening fence
	lang string
	body []string
}

func (b docBlock) String() string { return fmt.Sprintf("%s:%d (%s)", b.file, b.line, b.lang) }

// runnableBlocks returns the marked blocks of README.md and docs/*.md. A marker not followed by a
// fence, or a fence never closed, is an error: a marker that silently selects nothing would let
// the docs drift again.
func runnableBlocks(root string) ([]docBlock, error) {
	files, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		return nil, err
	}
	files = append([]string{filepath.Join(root, "README.md")}, files...)
	var out []docBlock
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		rel, _ := filepath.Rel(root, f)
		bs, err := parseRunnable(rel, string(data))
		if err != nil {
			return nil, err
		}
		out = append(out, bs...)
	}
	return out, nil
}

func parseRunnable(file, text string) ([]docBlock, error) {
	lines := strings.Split(text, "\n")
	var out []docBlock
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != docsMarker {
			continue
		}
		if i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], "```") {
			return nil, fmt.Errorf("%s:%d: %s must be followed directly by a ``` fence", file, i+1, docsMarker)
		}
		b := docBlock{file: file, line: i + 2, lang: strings.TrimSpace(strings.TrimPrefix(lines[i+1], "```"))}
		j := i + 2
		for ; j < len(lines) && strings.TrimSpace(lines[j]) != "```"; j++ {
			b.body = append(b.body, lines[j])
		}
		if j >= len(lines) {
			return nil, fmt.Errorf("%s:%d: runnable block is never closed", file, b.line)
		}
		out = append(out, b)
		i = j
	}
	return out, nil
}

var (
	loopbackPort = regexp.MustCompile(`127\.0\.0\.1:(\d+)`)
	listenFlag   = regexp.MustCompile(`--listen\s+127\.0\.0\.1:(\d+)`)
	docPaths     = regexp.MustCompile(`bin/ute|/tmp/ute`)
)

// shellScript turns a documented shell block into the script the test runs.
// A line that starts with `go ` (building a documented example program) runs in the repository
// root, where a reader runs it; the block itself runs in a scratch directory.
func shellScript(b docBlock, root, bin, tmp string, ports map[string]string) (string, error) {
	var s strings.Builder
	s.WriteString("set -e\n")
	for i, line := range b.body {
		// One pass, so that a replacement (the binary lives under /tmp) is never rewritten again.
		l := docPaths.ReplaceAllStringFunc(line, func(m string) string {
			if m == "bin/ute" {
				return bin
			}
			return tmp
		})
		l = loopbackPort.ReplaceAllStringFunc(l, func(m string) string {
			return "127.0.0.1:" + ports[strings.TrimPrefix(m, "127.0.0.1:")]
		})
		trimmed := strings.TrimSpace(l)
		switch {
		case trimmed == "make build":
			s.WriteString(": make build: the test built the binary\n")
		case strings.HasPrefix(trimmed, "go "):
			s.WriteString("go -C " + shellQuote(root) + " " + strings.TrimPrefix(trimmed, "go ") + "\n")
		case strings.HasSuffix(trimmed, expectFailure):
			cmd := strings.TrimSpace(strings.TrimSuffix(trimmed, expectFailure))
			fmt.Fprintf(&s, "if __out=$({ %s\n} 2>&1); then echo %q >&2; exit 1; fi\nprintf '%%s\\n' \"$__out\"\n",
				cmd, fmt.Sprintf("%s:%d: expected to fail but succeeded: %s", b.file, b.line+1+i, line))
			if i+1 < len(b.body) {
				if shown, ok := strings.CutPrefix(strings.TrimSpace(b.body[i+1]), "#"); ok && strings.HasPrefix(shown, "   ") {
					want, _, _ := strings.Cut(strings.TrimSpace(shown), "…")
					fmt.Fprintf(&s, "case \"$__out\" in *%s*) ;; *) echo %q >&2; exit 1;; esac\n",
						shellQuote(strings.TrimSpace(want)), fmt.Sprintf("%s:%d: the output does not show %q", b.file, b.line+2+i, want))
				}
			}
		default:
			s.WriteString(l + "\n")
			if strings.HasSuffix(stripComment(trimmed), "&") {
				if m := listenFlag.FindStringSubmatch(l); m != nil {
					p, err := strconv.Atoi(m[1])
					if err != nil {
						return "", err
					}
					// /proc/net/udp lists bound sockets as HEXIP:HEXPORT.
					fmt.Fprintf(&s, "for __i in $(seq %d); do grep -qi ':%04X ' /proc/net/udp && break; sleep 0.1; done\n",
						listenWaitSecs*10, p)
				}
			}
		}
	}
	return s.String(), nil
}

// stripComment drops a trailing shell comment (" # ..."); good enough for documentation lines,
// which never put # inside quotes before a trailing comment.
func stripComment(l string) string {
	if i := strings.Index(l, " #"); i >= 0 {
		return strings.TrimSpace(l[:i])
	}
	return l
}

// shellQuote quotes s for a bash case pattern: single quotes, so * and ? in the docs match literally.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// freeUDPPort returns a loopback UDP port that was free a moment ago.
func freeUDPPort(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	defer func() { _ = c.Close() }()
	return strconv.Itoa(c.LocalAddr().(*net.UDPAddr).Port)
}

// runScript runs script under bash in its own process group in dir, and kills the whole group
// (the daemons the script put in the background included) when it returns.
func runScript(t *testing.T, dir, script string) (int, string) {
	t.Helper()
	out, err := os.Create(filepath.Join(t.TempDir(), "output"))
	require.NoError(t, err)
	defer func() { _ = out.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), blockTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-e", "-c", script)
	cmd.Dir = dir
	// A file, not a pipe: background daemons inherit it, and Wait must not wait for them.
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	require.NoError(t, cmd.Start())
	pgid := cmd.Process.Pid
	err = cmd.Wait()
	killGroup(t, pgid)
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	text, rerr := os.ReadFile(out.Name())
	require.NoError(t, rerr)
	return code, string(text)
}

// killGroup stops every process left in the group: SIGTERM first so daemons shut down cleanly,
// then SIGKILL, and waits until the group is gone.
func killGroup(t *testing.T, pgid int) {
	t.Helper()
	if syscall.Kill(-pgid, syscall.SIGTERM) != nil {
		return // nothing left
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if syscall.Kill(-pgid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	for i := 0; i < 100 && syscall.Kill(-pgid, 0) == nil; i++ {
		time.Sleep(50 * time.Millisecond)
	}
	assert.Error(t, syscall.Kill(-pgid, 0), "process group %d still alive", pgid)
}

// buildGoSnippet compiles a Go block, a whole program (package main and its imports), against
// this repository. It is placed in the module through `go build -overlay`, so nothing is written
// into the shared work tree; it is built, not run (it needs a joined node to do anything).
func buildGoSnippet(t *testing.T, root string, b docBlock) (string, error) {
	t.Helper()
	tmp := t.TempDir()
	src := filepath.Join(tmp, "main.go")
	if err := os.WriteFile(src, []byte(strings.Join(b.body, "\n")+"\n"), 0o644); err != nil {
		return "", err
	}
	pkg := fmt.Sprintf("zz_docsnippet_%d_%d", os.Getpid(), b.line)
	overlay, err := json.Marshal(map[string]map[string]string{"Replace": {filepath.Join(root, pkg, "main.go"): src}})
	if err != nil {
		return "", err
	}
	ov := filepath.Join(tmp, "overlay.json")
	if err := os.WriteFile(ov, overlay, 0o644); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), blockTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-overlay", ov, "-o", filepath.Join(tmp, "snippet"), "./"+pkg)
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	require.NoError(t, err)
	_, err = os.Stat(filepath.Join(root, "go.mod"))
	require.NoError(t, err, "cmd/ute tests run from cmd/ute")
	return root
}

func TestDocsRunnableBlocks(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the blocks wait on /proc/net/udp")
	}
	root := repoRoot(t)
	blocks, err := runnableBlocks(root)
	require.NoError(t, err)
	var quickStart bool
	for _, b := range blocks {
		quickStart = quickStart || (b.file == "README.md" && len(b.body) > 0)
	}
	require.True(t, quickStart, "README.md's quick start must be marked %s", docsMarker)

	for _, b := range blocks {
		t.Run(fmt.Sprintf("%s:%d", b.file, b.line), func(t *testing.T) {
			switch b.lang {
			case "sh", "bash", "shell":
			case "go":
				out, err := buildGoSnippet(t, root, b)
				require.NoError(t, err, "%s does not compile:\n%s", b, out)
				return
			default:
				t.Fatalf("%s: runnable blocks are sh, bash or go, not %q", b, b.lang)
			}
			dir := t.TempDir()
			require.NoError(t, os.Symlink(filepath.Join(root, "docs"), filepath.Join(dir, "docs")))
			ports := map[string]string{}
			for _, l := range b.body {
				for _, m := range loopbackPort.FindAllStringSubmatch(l, -1) {
					if _, ok := ports[m[1]]; !ok {
						ports[m[1]] = freeUDPPort(t)
					}
				}
			}
			script, err := shellScript(b, root, uteBin, filepath.Join(t.TempDir(), "ute"), ports)
			require.NoError(t, err)
			code, out := runScript(t, dir, script)
			require.Equal(t, 0, code, "%s failed; output:\n%s\nscript:\n%s", b, out, script)
			t.Logf("%s output:\n%s", b, out)
		})
	}
}

// The harness itself: an expected failure that succeeds, a failure without the mark, a shown
// output that differs, and a marker without a fence all fail; background processes die with the
// block.
func TestDocsHarnessRefusesDrift(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("process groups and /proc")
	}
	run := func(body ...string) (int, string) {
		script, err := shellScript(docBlock{file: "x.md", line: 1, lang: "sh", body: body}, t.TempDir(), uteBin, t.TempDir(), nil)
		require.NoError(t, err)
		return runScript(t, t.TempDir(), script)
	}
	code, out := run("true " + expectFailure)
	assert.NotEqual(t, 0, code)
	assert.Contains(t, out, "x.md:2: expected to fail but succeeded: true # expect failure")

	code, _ = run("false", "true")
	assert.NotEqual(t, 0, code, "bash -e stops at an unmarked failure")

	code, out = run("echo 'ute: join token already used: token abc was consumed' >&2; false "+expectFailure, "#   ute: join token already used: token … was consumed")
	assert.Equal(t, 0, code, out)
	code, out = run("echo 'ute: something else' >&2; false "+expectFailure, "#   ute: join token already used: token … was consumed")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, out, `the output does not show "ute: join token already used: token "`)

	// A background sleeper is gone once the block returns.
	pidFile := filepath.Join(t.TempDir(), "pid")
	code, out = run("sleep 300 &", "echo $! > "+pidFile)
	require.Equal(t, 0, code, out)
	raw, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	require.NoError(t, err)
	assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "the background process was killed")

	// A Go block compiles against this module, or the test says why not.
	root := repoRoot(t)
	out, err = buildGoSnippet(t, root, docBlock{file: "z.md", line: 7, lang: "go", body: []string{
		"package main", "", `import "github.com/ute-project/ute/identity"`, "", "func main() { _, _ = identity.GenerateKey() }"}})
	require.NoError(t, err, out)
	out, err = buildGoSnippet(t, root, docBlock{file: "z.md", line: 8, lang: "go", body: []string{
		"package main", "", `import "github.com/ute-project/ute/identity"`, "", "func main() { identity.NoSuchFunction() }"}})
	require.Error(t, err)
	assert.Contains(t, out, "NoSuchFunction")

	_, err = parseRunnable("y.md", "text\n"+docsMarker+"\nnot a fence\n")
	assert.ErrorContains(t, err, "y.md:2: <!-- runnable --> must be followed directly by a ``` fence")
	_, err = parseRunnable("y.md", docsMarker+"\n```sh\ntrue\n")
	assert.ErrorContains(t, err, "never closed")
	bs, err := parseRunnable("y.md", "```sh\nnot marked\n```\n"+docsMarker+"\n```sh\ntrue\n```\n")
	require.NoError(t, err)
	require.Len(t, bs, 1)
	assert.Equal(t, []string{"true"}, bs[0].body)
	assert.Equal(t, 5, bs[0].line)
}
