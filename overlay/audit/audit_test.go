package audit

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func openLog(t *testing.T, dir string, opts Options) *Log {
	t.Helper()
	l, err := Open(dir, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// writeLog creates a closed, fully anchored log with n entries.
func writeLog(t *testing.T, n int) string {
	t.Helper()
	dir := t.TempDir()
	l, err := Open(dir, Options{})
	require.NoError(t, err)
	for i := 0; i < n; i++ {
		ev := EventAdmit
		if i%3 == 2 {
			ev = EventDeny
		}
		require.NoError(t, l.Append(context.Background(), Entry{Event: ev, Fields: map[string]string{
			"agent": fmt.Sprintf("spiffe://acme.internal/zone/payments/agent/a%d", i),
			"flow":  fmt.Sprint(i),
		}}))
	}
	require.NoError(t, l.Close())
	return dir
}

func logLines(t *testing.T, dir string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	return bytes.SplitAfter(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
}

func putLines(t *testing.T, dir string, lines [][]byte) {
	t.Helper()
	var b []byte
	for _, l := range lines {
		b = append(b, l...)
		if !bytes.HasSuffix(l, []byte("\n")) {
			b = append(b, '\n')
		}
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, LogFile), b, 0o600))
}

func TestCleanLogVerifies(t *testing.T) {
	dir := writeLog(t, 10)
	rep, err := Verify(dir)
	require.NoError(t, err)
	assert.True(t, rep.OK)
	assert.Equal(t, 10, rep.Entries)
	assert.Equal(t, 10, rep.Anchored)
	assert.Equal(t, 0, rep.Unanchored)
	assert.Equal(t, -1, rep.FirstBad)

	info, err := os.Stat(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	info, err = os.Stat(filepath.Join(dir, HeadFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
}

func TestTamperingDetected(t *testing.T) {
	cases := []struct {
		name    string
		tamper  func(t *testing.T, dir string)
		want    error
		atIndex int
	}{
		{"one byte of an entry edited", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			lines[4] = bytes.Replace(lines[4], []byte(`"event":"admit"`), []byte(`"event":"admiT"`), 1)
			putLines(t, dir, lines)
		}, ErrEdited, 4},
		{"field value edited", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			lines[2] = bytes.Replace(lines[2], []byte(`"event":"deny"`), []byte(`"event":"admi"`), 1)
			putLines(t, dir, lines)
		}, ErrEdited, 2},
		{"key case changed (same meaning to encoding/json)", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			lines[3] = bytes.Replace(lines[3], []byte(`"event"`), []byte(`"Event"`), 1)
			putLines(t, dir, lines)
		}, ErrEdited, 3},
		{"entry rewritten with a recomputed hash", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			r, _, err := decodeLine(bytes.TrimSuffix(lines[5], []byte("\n")))
			require.NoError(t, err)
			r.Event = EventAdmit
			r.Fields["agent"] = "spiffe://acme.internal/zone/payments/agent/innocent"
			line, _, err := r.encode()
			require.NoError(t, err)
			lines[5] = line
			putLines(t, dir, lines)
		}, ErrBrokenChain, 6},
		{"middle entry removed", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			putLines(t, dir, append(lines[:3:3], lines[4:]...))
		}, ErrGap, 3},
		{"two entries swapped", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			lines[6], lines[7] = lines[7], lines[6]
			putLines(t, dir, lines)
		}, ErrReordered, 6},
		{"tail truncated", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			putLines(t, dir, lines[:7])
		}, ErrTruncated, 7},
		{"all entries removed", func(t *testing.T, dir string) {
			require.NoError(t, os.WriteFile(filepath.Join(dir, LogFile), nil, 0o600))
		}, ErrTruncated, 0},
		{"tail truncated and head deleted", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			putLines(t, dir, lines[:7])
			require.NoError(t, os.Remove(filepath.Join(dir, HeadFile)))
		}, ErrHeadMissing, 6},
		{"tail replaced with forged entries", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			r, h, err := decodeLine(bytes.TrimSuffix(lines[7], []byte("\n")))
			require.NoError(t, err)
			_ = r
			lines = lines[:8]
			for seq := uint64(9); seq <= 10; seq++ {
				f := Record{Seq: seq, Time: time.Now().UTC().Format(time.RFC3339Nano), Event: EventAdmit, Prev: h}
				var line []byte
				line, h, err = f.encode()
				require.NoError(t, err)
				lines = append(lines, line)
			}
			putLines(t, dir, lines)
		}, ErrHeadChanged, 9},
		{"torn last line", func(t *testing.T, dir string) {
			b, err := os.ReadFile(filepath.Join(dir, LogFile))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(dir, LogFile), b[:len(b)-20], 0o600))
		}, ErrTornTail, 9},
		{"garbage line", func(t *testing.T, dir string) {
			lines := logLines(t, dir)
			lines[1] = []byte("not json at all\n")
			putLines(t, dir, lines)
		}, ErrEdited, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeLog(t, 10)
			tc.tamper(t, dir)
			rep, err := Verify(dir)
			require.ErrorIs(t, err, tc.want)
			var ve *VerifyError
			require.ErrorAs(t, err, &ve)
			assert.Equal(t, tc.atIndex, ve.Index)
			assert.False(t, rep.OK)
			assert.Equal(t, tc.atIndex, rep.FirstBad)
			assert.NotContains(t, err.Error(), "\n")
			assert.Contains(t, err.Error(), fmt.Sprintf("entry %d", tc.atIndex+1))

			// A tampered log refuses to be continued.
			_, err = Open(dir, Options{})
			require.ErrorIs(t, err, tc.want)
		})
	}
}

func TestReopenContinuesChain(t *testing.T) {
	dir := writeLog(t, 3)
	l := openLog(t, dir, Options{FlushInterval: -1})
	assert.Equal(t, uint64(3), l.Len())
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventRevoke, Fields: map[string]string{"subject": "n2"}}))
	require.NoError(t, l.Close())
	rep, err := Verify(dir)
	require.NoError(t, err)
	assert.Equal(t, 4, rep.Entries)
	assert.Equal(t, 4, rep.Anchored)
}

func TestTornTailFromCrashIsCutOnOpen(t *testing.T) {
	dir := writeLog(t, 4)
	f, err := os.OpenFile(filepath.Join(dir, LogFile), os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	_, err = f.WriteString(`{"seq":5,"time":"2026-`)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	l := openLog(t, dir, Options{FlushInterval: -1})
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit}))
	require.NoError(t, l.Close())
	rep, err := Verify(dir)
	require.NoError(t, err)
	assert.Equal(t, 5, rep.Entries)
}

func TestUnanchoredEntriesReported(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{FlushInterval: time.Hour})
	for i := 0; i < 3; i++ {
		require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit}))
	}
	rep, err := Verify(dir)
	require.NoError(t, err)
	assert.Equal(t, 3, rep.Entries)
	assert.Equal(t, 0, rep.Anchored)
	assert.Equal(t, 3, rep.Unanchored)
	require.NoError(t, l.Sync())
	rep, err = Verify(dir)
	require.NoError(t, err)
	assert.Equal(t, 3, rep.Anchored)
}

func TestFlusherAnchors(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{FlushInterval: 5 * time.Millisecond})
	// The flusher sleeps between bursts and wakes again for each: every burst is anchored.
	for want := 1; want <= 3; want++ {
		require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit}))
		require.Eventually(t, func() bool {
			rep, err := Verify(dir)
			return err == nil && rep.Anchored == want
		}, 5*time.Second, 5*time.Millisecond, "entry %d never anchored", want)
		time.Sleep(20 * time.Millisecond) // past the interval: the flusher is idle again
	}
}

func TestConcurrentAppends(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{FlushInterval: time.Millisecond})
	var wg sync.WaitGroup
	const workers, each = 8, 50
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				assert.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny, Fields: map[string]string{"worker": fmt.Sprint(w), "i": fmt.Sprint(i)}}))
			}
		}()
	}
	wg.Wait()
	require.NoError(t, l.Close())
	rep, err := Verify(dir)
	require.NoError(t, err)
	assert.Equal(t, workers*each, rep.Entries)
	assert.Equal(t, workers*each, rep.Anchored)
}

func TestSecondWriterRefused(t *testing.T) {
	dir := t.TempDir()
	openLog(t, dir, Options{})
	_, err := Open(dir, Options{})
	require.ErrorIs(t, err, ErrLocked)
}

func TestAppendRefusals(t *testing.T) {
	l := openLog(t, t.TempDir(), Options{})
	ctx := context.Background()
	for name, e := range map[string]Entry{
		"empty event":     {},
		"uppercase event": {Event: "Admit"},
		"newline event":   {Event: "admit\n"},
		"bad field name":  {Event: "admit", Fields: map[string]string{"a b": "x"}},
		"huge value":      {Event: "admit", Fields: map[string]string{"a": strings.Repeat("x", MaxFieldValue+1)}},
	} {
		require.ErrorIs(t, l.Append(ctx, e), ErrBadEntry, name)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	require.ErrorIs(t, l.Append(cancelled, Entry{Event: EventAdmit}), context.Canceled)
	require.NoError(t, l.Close())
	require.ErrorIs(t, l.Append(ctx, Entry{Event: EventAdmit}), ErrClosed)
	assert.Equal(t, uint64(0), l.Len())
}

func TestVerifyMissingLog(t *testing.T) {
	_, err := Verify(t.TempDir())
	require.ErrorIs(t, err, ErrNoLog)
}

func TestFieldValuesSurviveRoundTrip(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{FlushInterval: -1})
	tricky := `quote " backslash \ <html> & newline` + "\n" + `tab	unicode é`
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny, Fields: map[string]string{"reason": tricky}}))
	require.NoError(t, l.Close())
	lines := logLines(t, dir)
	require.Len(t, lines, 1)
	r, _, err := decodeLine(bytes.TrimSuffix(lines[0], []byte("\n")))
	require.NoError(t, err)
	assert.Equal(t, tricky, r.Fields["reason"])
	_, err = Verify(dir)
	require.NoError(t, err)
}

func FuzzVerifyLine(f *testing.F) {
	r := Record{Seq: 1, Time: "2026-01-01T00:00:00Z", Event: "admit", Fields: map[string]string{"a": "b"}, Prev: genesis}
	line, _, err := r.encode()
	require.NoError(f, err)
	f.Add(bytes.TrimSuffix(line, []byte("\n")))
	f.Add([]byte(`{"seq":1,"hash":"00"}`))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		rec, h, err := decodeLine(in)
		if err != nil {
			return
		}
		again, h2, err := rec.encode()
		require.NoError(t, err)
		require.Equal(t, h, h2)
		require.Equal(t, in, bytes.TrimSuffix(again, []byte("\n")), "an accepted line has exactly one encoding")
	})
}

func BenchmarkAppend(b *testing.B) {
	for _, tc := range []struct {
		name     string
		interval time.Duration
	}{{"batched", 100 * time.Millisecond}, {"fsync-each", -1}} {
		b.Run(tc.name, func(b *testing.B) {
			l, err := Open(b.TempDir(), Options{FlushInterval: tc.interval})
			require.NoError(b, err)
			defer l.Close()
			e := Entry{Event: EventAdmit, Fields: map[string]string{"agent": "spiffe://acme.internal/zone/payments/agent/billing", "peer": "spiffe://acme.internal/node/n1", "flow": "42"}}
			for b.Loop() {
				if err := l.Append(context.Background(), e); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func TestSignedHead(t *testing.T) {
	_, key, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	pub := key.Public().(ed25519.PublicKey)
	dir := t.TempDir()
	l := openLog(t, dir, Options{Key: key, FlushInterval: -1})
	for i := 0; i < 4; i++ {
		require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit, Fields: map[string]string{"i": fmt.Sprint(i)}}))
	}
	require.NoError(t, l.Close())

	rep, err := VerifyWithKey(dir, pub)
	require.NoError(t, err)
	assert.True(t, rep.Signed)

	// Reopening with the key continues; with another key it refuses.
	l = openLog(t, dir, Options{Key: key, FlushInterval: -1})
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny}))
	require.NoError(t, l.Close())
	_, other, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	_, err = Open(dir, Options{Key: other})
	require.ErrorIs(t, err, ErrHeadSignature)

	// An attacker without the key rewrites the whole log consistently and writes a fresh head:
	// the plain chain check passes, the signed check does not.
	forged := t.TempDir()
	fl := openLog(t, forged, Options{FlushInterval: -1})
	for i := 0; i < 5; i++ {
		require.NoError(t, fl.Append(context.Background(), Entry{Event: EventAdmit}))
	}
	require.NoError(t, fl.Close())
	for _, name := range []string{LogFile, HeadFile} {
		b, err := os.ReadFile(filepath.Join(forged, name))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), b, 0o600))
	}
	_, err = Verify(dir)
	require.NoError(t, err, "an unkeyed chain cannot tell a consistent rewrite")
	_, err = VerifyWithKey(dir, pub)
	require.ErrorIs(t, err, ErrHeadSignature)
	_, err = Open(dir, Options{Key: key})
	require.ErrorIs(t, err, ErrHeadSignature)
}
