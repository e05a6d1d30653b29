package audit

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func records(t *testing.T, dir string) []Record {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, LogFile))
	require.NoError(t, err)
	defer func() { _ = f.Close() }()
	var out []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, maxLine)
	for sc.Scan() {
		var r Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		out = append(out, r)
	}
	return out
}

// The attack the unsigned head cannot see: cut the last entries and rewrite the head to anchor
// what is left. With the head signed by the node key, VerifyWithKey names it, and a node that
// reopens the log (RecordKeyChange) continues but leaves the evidence in the chain.
func TestTailCutWithRewrittenHeadIsDetected(t *testing.T) {
	_, key, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	pub := key.Public().(ed25519.PublicKey)
	dir := t.TempDir()
	l := openLog(t, dir, Options{Key: key, RecordKeyChange: true, FlushInterval: -1})
	for i := range 5 {
		require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny, Fields: map[string]string{"i": fmt.Sprint(i)}}))
	}
	require.NoError(t, l.Close())

	lines := logLines(t, dir)
	putLines(t, dir, lines[:3])
	_, h, err := decodeLine(lines[2][:len(lines[2])-1])
	require.NoError(t, err)
	require.NoError(t, writeHead(dir, head{Count: 3, Hash: h}))

	_, err = Verify(dir)
	require.NoError(t, err, "the unkeyed chain cannot see it: this is what the signature is for")
	_, err = VerifyWithKey(dir, pub)
	require.ErrorIs(t, err, ErrHeadSignature)

	l = openLog(t, dir, Options{Key: key, RecordKeyChange: true, FlushInterval: -1})
	require.NoError(t, l.Close())
	rep, err := VerifyWithKey(dir, pub)
	require.NoError(t, err)
	assert.True(t, rep.Signed)
	recs := records(t, dir)
	require.Len(t, recs, 4)
	ev := recs[3]
	assert.Equal(t, EventHeadUnverified, ev.Event)
	assert.Equal(t, "unverified", ev.Fields["problem"])
	assert.Equal(t, "3", ev.Fields["count"])
	assert.Equal(t, hex.EncodeToString(pub), ev.Fields["to"])
}

// A node key renewed between two runs is a key change, not a forgery: the log continues under the
// new key and records the previous one.
func TestKeyChangeIsRecorded(t *testing.T) {
	_, oldKey, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	_, newKey, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	dir := t.TempDir()
	l := openLog(t, dir, Options{Key: oldKey, RecordKeyChange: true, FlushInterval: -1})
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit}))
	require.NoError(t, l.Close())

	// Without RecordKeyChange another key is still refused.
	_, err = Open(dir, Options{Key: newKey})
	require.ErrorIs(t, err, ErrHeadSignature)

	l = openLog(t, dir, Options{Key: newKey, RecordKeyChange: true, FlushInterval: -1})
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny}))
	require.NoError(t, l.Close())
	_, err = VerifyWithKey(dir, newKey.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	_, err = VerifyWithKey(dir, oldKey.Public().(ed25519.PublicKey))
	require.ErrorIs(t, err, ErrHeadSignature)
	recs := records(t, dir)
	require.Len(t, recs, 3)
	assert.Equal(t, EventHeadUnverified, recs[1].Event)
	assert.Equal(t, "key-changed", recs[1].Fields["problem"])
	assert.Equal(t, hex.EncodeToString(oldKey.Public().(ed25519.PublicKey)), recs[1].Fields["from"])
	assert.Equal(t, EventDeny, recs[2].Event)
}
