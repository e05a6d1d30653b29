package audit

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Issue 10 §4: what the node key did not sign is never accepted as verified nor laundered by a
// restart. Each attack is made by someone who can write the log's files but does not hold the key.

var quiet = slog.New(slog.DiscardHandler)

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	return k
}

// nodeLog writes n entries as a node does (signed heads, SetAside) and closes the log.
func nodeLog(t *testing.T, key ed25519.PrivateKey, n int) string {
	t.Helper()
	dir := t.TempDir()
	l := openLog(t, dir, Options{Key: key, SetAside: true, FlushInterval: -1, Logger: quiet})
	for i := range n {
		require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny, Fields: map[string]string{"i": fmt.Sprint(i)}}))
	}
	require.NoError(t, l.Close())
	return dir
}

// forgeAppend appends an entry correctly chained to the last one, as anyone who can read the log
// can compute, without touching the head (which the forger cannot sign).
func forgeAppend(t *testing.T, dir string, event string) {
	t.Helper()
	lines := logLines(t, dir)
	last, h, err := decodeLine(bytes.TrimSuffix(lines[len(lines)-1], []byte("\n")))
	require.NoError(t, err)
	rec := Record{Seq: last.Seq + 1, Time: last.Time, Event: event, Prev: h}
	line, _, err := rec.encode()
	require.NoError(t, err)
	f, err := os.OpenFile(filepath.Join(dir, LogFile), os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	_, err = f.Write(line)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

// reopen is a node start: open with SetAside and the key, then close.
func reopen(t *testing.T, dir string, key ed25519.PrivateKey, trusted ...ed25519.PublicKey) []Record {
	t.Helper()
	l := openLog(t, dir, Options{Key: key, SetAside: true, TrustedKeys: trusted, FlushInterval: -1, Logger: quiet})
	require.NoError(t, l.Close())
	return records(t, dir)
}

func pubOf(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }

func TestForgedAppendIsUnanchored(t *testing.T) {
	key := newKey(t)
	dir := nodeLog(t, key, 3)
	forgeAppend(t, dir, "admit")

	rep, err := VerifyWithKeys(dir, pubOf(key))
	require.NoError(t, err, "the chain and the head are intact")
	assert.Equal(t, 1, rep.Unanchored, "the forged entry is after the signed head")
	assert.Equal(t, 3, rep.Anchored)
	assert.Equal(t, hex.EncodeToString(pubOf(key)), rep.Key)
}

func TestForgedAppendPlusRestartIsSetAsideNotSigned(t *testing.T) {
	key := newKey(t)
	dir := nodeLog(t, key, 3)
	forgeAppend(t, dir, "admit")

	recs := reopen(t, dir, key)
	require.Len(t, recs, 4, "3 entries and the set-aside record; the forged entry is not in the chain")
	for _, r := range recs[:3] {
		assert.Equal(t, EventDeny, r.Event)
	}
	ev := recs[3]
	assert.Equal(t, EventSetAside, ev.Event)
	assert.Equal(t, "tail", ev.Fields["part"])
	assert.Equal(t, "1", ev.Fields["entries"])
	assert.Equal(t, "4", ev.Fields["first_seq"])

	rep, err := VerifyWithKeys(dir, pubOf(key))
	require.NoError(t, err)
	assert.Zero(t, rep.Unanchored)
	require.Len(t, rep.Aside, 1, "the forged entry is kept, named and reported")
	assert.Equal(t, ev.Fields["file"], rep.Aside[0].File)
	assert.Equal(t, 1, rep.Aside[0].Entries)
	kept, err := os.ReadFile(filepath.Join(dir, rep.Aside[0].File))
	require.NoError(t, err)
	assert.Contains(t, string(kept), `"event":"admit"`)
}

// Edited and reordered lines: Verify names them; a restart does not continue over them but sets
// the whole log aside and starts a new one that records it.
func TestEditedOrReorderedLogIsSetAsideWhole(t *testing.T) {
	for name, tamper := range map[string]func(lines [][]byte){
		"edited":    func(lines [][]byte) { lines[1] = []byte(strings.Replace(string(lines[1]), `"i":"1"`, `"i":"9"`, 1)) },
		"reordered": func(lines [][]byte) { lines[1], lines[2] = lines[2], lines[1] },
	} {
		t.Run(name, func(t *testing.T) {
			key := newKey(t)
			dir := nodeLog(t, key, 4)
			lines := logLines(t, dir)
			tamper(lines)
			putLines(t, dir, lines)

			_, err := VerifyWithKeys(dir, pubOf(key))
			var ve *VerifyError
			require.ErrorAs(t, err, &ve)
			assert.Equal(t, 1, ve.Index)

			recs := reopen(t, dir, key)
			require.Len(t, recs, 1, "a new log, starting with what happened to the old one")
			assert.Equal(t, EventSetAside, recs[0].Event)
			assert.Equal(t, "log", recs[0].Fields["part"])
			assert.Equal(t, "4", recs[0].Fields["entries"])
			assert.Contains(t, recs[0].Fields["reason"], "entry 2")

			rep, err := VerifyWithKeys(dir, pubOf(key))
			require.NoError(t, err)
			require.Len(t, rep.Aside, 1)
			_, err = Verify(filepath.Join(dir)) // the new log verifies; the old is kept as found
			require.NoError(t, err)
			kept, err := os.ReadFile(filepath.Join(dir, rep.Aside[0].File))
			require.NoError(t, err)
			assert.Equal(t, 4, strings.Count(string(kept), "\n"))
		})
	}
}

// A cut tail with the signed head left as it was: Verify reports the truncation; a restart sets
// the log aside instead of refusing to start or re-anchoring the cut.
func TestCutTailDetectedBeforeAndAfterRestart(t *testing.T) {
	key := newKey(t)
	dir := nodeLog(t, key, 5)
	putLines(t, dir, logLines(t, dir)[:3])

	_, err := VerifyWithKeys(dir, pubOf(key))
	require.ErrorIs(t, err, ErrTruncated)

	recs := reopen(t, dir, key)
	require.Len(t, recs, 1)
	assert.Equal(t, EventSetAside, recs[0].Event)
	assert.Contains(t, recs[0].Fields["reason"], "head records 5 entries, the log has 3")
	rep, err := VerifyWithKeys(dir, pubOf(key))
	require.NoError(t, err)
	require.Len(t, rep.Aside, 1, "still reported after the restart")

	recs = reopen(t, dir, key) // and after any later restart
	require.Len(t, recs, 1)
	rep, err = VerifyWithKeys(dir, pubOf(key))
	require.NoError(t, err)
	require.Len(t, rep.Aside, 1)
}

// The reported attack: cut the tail and rewrite the head (unsigned, or signed by another key)
// to anchor what is left. The restart no longer signs over it.
func TestCutTailWithRewrittenHeadPlusRestart(t *testing.T) {
	for name, sign := range map[string]ed25519.PrivateKey{"unsigned": nil, "other key": newKey(t)} {
		t.Run(name, func(t *testing.T) {
			key := newKey(t)
			dir := nodeLog(t, key, 5)
			lines := logLines(t, dir)
			putLines(t, dir, lines[:3])
			_, h, err := decodeLine(bytes.TrimSuffix(lines[2], []byte("\n")))
			require.NoError(t, err)
			forged := head{Count: 3, Hash: h}
			forged.sign(sign)
			require.NoError(t, writeHead(dir, forged))

			_, err = VerifyWithKeys(dir, pubOf(key))
			require.ErrorIs(t, err, ErrHeadSignature)

			recs := reopen(t, dir, key)
			require.Len(t, recs, 1, "the cut log is not continued")
			assert.Equal(t, EventSetAside, recs[0].Event)
			assert.Contains(t, recs[0].Fields["reason"], "head not signed by this node's key")
			assert.Equal(t, "3", recs[0].Fields["entries"])
			rep, err := VerifyWithKeys(dir, pubOf(key))
			require.NoError(t, err)
			require.Len(t, rep.Aside, 1)
			_, err = os.Stat(filepath.Join(dir, HeadFile+asideInfix+strings.TrimPrefix(rep.Aside[0].File, LogFile+asideInfix)))
			require.NoError(t, err, "the forged head is kept beside the log it claimed to anchor")
		})
	}
}

// A routine renewal: the head signed by the previous key verifies with that key trusted (the
// node directory's handover), and a restart continues, recording the change.
func TestRenewalKeyChangeVerifies(t *testing.T) {
	oldKey, newKey := newKey(t), newKey(t)
	dir := nodeLog(t, oldKey, 2)

	_, err := VerifyWithKeys(dir, pubOf(newKey))
	require.ErrorIs(t, err, ErrHeadSignature, "the new key alone cannot vouch for the old head")
	rep, err := VerifyWithKeys(dir, pubOf(newKey), pubOf(oldKey))
	require.NoError(t, err)
	assert.Equal(t, hex.EncodeToString(pubOf(oldKey)), rep.Key)

	recs := reopen(t, dir, newKey, pubOf(oldKey))
	require.Len(t, recs, 3)
	assert.Equal(t, EventKeyChanged, recs[2].Event)
	assert.Equal(t, hex.EncodeToString(pubOf(oldKey)), recs[2].Fields["from"])
	assert.Equal(t, hex.EncodeToString(pubOf(newKey)), recs[2].Fields["to"])
	rep, err = VerifyWithKeys(dir, pubOf(newKey), pubOf(oldKey))
	require.NoError(t, err)
	assert.Equal(t, hex.EncodeToString(pubOf(newKey)), rep.Key)
	assert.Empty(t, rep.Aside)

	// Without the handover the old key's head is not trusted: set aside, not laundered.
	dir = nodeLog(t, oldKey, 2)
	recs = reopen(t, dir, newKey)
	require.Len(t, recs, 1)
	assert.Equal(t, EventSetAside, recs[0].Event)
}
