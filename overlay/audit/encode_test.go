package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// jsonLine is the line as encoding/json makes it: the reference the hand-written encoder must
// match byte for byte (decodeLine checks every verified line against json.Marshal).
func jsonLine(t testing.TB, r *Record) []byte {
	t.Helper()
	if len(r.Fields) == 0 {
		r.Fields = nil
	}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	return b
}

var trickyStrings = []string{
	"", "plain", `quote " backslash \ slash /`, "<html> & </html>", "nl\n cr\r tab\t bs\b ff\f nul\x00 esc\x1b del\x7f",
	"é ü 日本 🙂", "line\u2028sep\u2029para", "\ufffd replacement", strings.Repeat("x", MaxFieldValue),
}

func TestEncodeMatchesJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range 2000 {
		r := &Record{Seq: rng.Uint64() >> rng.IntN(64), Time: "2026-12-06T05:40:01.123456789Z", Event: EventAdmit,
			Prev: genesis, Fields: map[string]string{}}
		for range rng.IntN(20) {
			k := []string{"agent", "node", "peer", "zone", "dst", "flow", "seq", "reason", "error", "a", "b.c", "z-1", "0"}[rng.IntN(13)]
			r.Fields[k] = trickyStrings[rng.IntN(len(trickyStrings))] + trickyStrings[rng.IntN(len(trickyStrings))]
		}
		want := jsonLine(t, r)
		var h [64]byte
		line := appendLine(nil, r.Seq, r.Time, r.Event, r.Fields, r.Prev, &h)
		require.Equal(t, string(want[:len(want)-1]), string(line[:len(want)-1]), "case %d", i)
		got, gh, err := decodeLine(bytes.TrimSuffix(line, []byte("\n")))
		require.NoError(t, err, "case %d", i)
		require.Equal(t, string(h[:]), gh)
		require.Equal(t, r.Seq, got.Seq)
	}
}

// TestAppendInvalidUTF8Verifies is the entry a peer can provoke: a field value cut inside a
// multi-byte character (truncate in the node cuts error messages at MaxFieldValue bytes).
// encoding/json writes its bad byte as the escape \ufffd, which decodes to U+FFFD and re-encodes
// as U+FFFD itself, so the line failed the canonical-form check and Verify reported the whole log
// as edited from that entry on.
func TestAppendInvalidUTF8Verifies(t *testing.T) {
	dir := t.TempDir()
	l := openLog(t, dir, Options{FlushInterval: -1})
	cut := strings.Repeat("é", MaxFieldValue/2)[:MaxFieldValue-1]
	require.False(t, utf8.ValidString(cut))
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventDeny, Fields: map[string]string{"error": cut, "raw": "a\xffb\xc3"}}))
	require.NoError(t, l.Append(context.Background(), Entry{Event: EventAdmit}))
	require.NoError(t, l.Close())
	rep, err := Verify(dir)
	require.NoError(t, err)
	require.Equal(t, 2, rep.Entries)
	r, _, err := decodeLine(bytes.TrimSuffix(logLines(t, dir)[0], []byte("\n")))
	require.NoError(t, err)
	require.Equal(t, string([]rune(cut)), r.Fields["error"], "each bad byte is kept as U+FFFD")
	require.Equal(t, "a\ufffdb\ufffd", r.Fields["raw"])
}

// FuzzEncodeMatchesJSON: for any field value, the line decodes and verifies, and for valid UTF-8
// it is exactly json.Marshal's.
func FuzzEncodeMatchesJSON(f *testing.F) {
	for _, s := range trickyStrings {
		f.Add("k", s)
	}
	f.Add("k", "a\xffb")
	f.Add("UPPER", "\xed\xa0\x80")
	f.Fuzz(func(t *testing.T, k, v string) {
		if string([]rune(k)) == "z" {
			return
		}
		r := &Record{Seq: 7, Time: "2026-12-06T05:40:01Z", Event: EventDeny, Prev: genesis, Fields: map[string]string{k: v, "z": "1"}}
		var h [64]byte
		line := bytes.TrimSuffix(appendLine(nil, r.Seq, r.Time, r.Event, r.Fields, r.Prev, &h), []byte("\n"))
		got, gh, err := decodeLine(line)
		require.NoError(t, err)
		require.Equal(t, string(h[:]), gh)
		require.Equal(t, string([]rune(v)), got.Fields[string([]rune(k))])
		if utf8.ValidString(k) && utf8.ValidString(v) {
			want := jsonLine(t, r)
			require.Equal(t, string(want[:len(want)-1]), string(line[:len(want)-1]))
		}
	})
}

func BenchmarkEncodeLine(b *testing.B) {
	fields := map[string]string{"peer": "spiffe://acme.internal/node/a", "zone": "payments",
		"agent": "spiffe://acme.internal/zone/payments/agent/billing-1", "node": "spiffe://acme.internal/node/a",
		"dst": "ledger:8080/tcp", "flow": "123456", "seq": "123456"}
	var buf []byte
	var h [64]byte
	b.ReportAllocs()
	for b.Loop() {
		buf = appendLine(buf[:0], 123456, "2026-12-06T05:40:01.123456789Z", EventAdmit, fields, genesis, &h)
	}
}
