package dtl

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

// exampleRecord builds the fixed example of docs/protocol.md. Ed25519 signatures are deterministic,
// so the bytes are stable across runs and the doc can be checked against them.
func exampleRecord(t *testing.T) (raw []byte, pub ed25519.PublicKey, session []byte, c *Claims) {
	t.Helper()
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{0x42}, ed25519.SeedSize))
	session = make([]byte, ExporterLen)
	for i := range session {
		session[i] = byte(i)
	}
	fp := sha256.Sum256([]byte("example workload"))
	chain := CertChain{Node: []byte("node certificate DER"), Agent: []byte("agent certificate DER")}
	h := chain.Hash()
	c = &Claims{
		Version:     Version1,
		Zone:        "payments",
		Agent:       "spiffe://acme.internal/zone/payments/agent/billing",
		ChainHash:   h[:],
		Node:        "spiffe://acme.internal/node/n1",
		Fingerprint: fp[:],
		Region:      "eu-west-1",
		Trust:       87,
		Drift:       0,
		Destination: Destination{Agent: "ledger", Port: 443, Proto: ProtoTCP},
		FlowID:      42,
		Seq:         7,
		IssuedAt:    time.UnixMilli(1767225600123),
	}
	raw, err := Sign(c, key, session)
	require.NoError(t, err)
	return raw, key.Public().(ed25519.PublicKey), session, c
}

// TestProtocolExample keeps docs/protocol.md's example honest: the record verifies, and the doc
// contains exactly these bytes. UTE_PROTOCOL_EXAMPLE=1 prints the section to paste into the doc.
func TestProtocolExample(t *testing.T) {
	raw, pub, session, c := exampleRecord(t)
	rec, err := Parse(raw)
	require.NoError(t, err)
	require.NoError(t, rec.Verify(pub, session))
	payload, err := c.Marshal()
	require.NoError(t, err)

	diag := func(b []byte) string {
		dm, err := cbor.DiagOptions{ByteStringEncoding: cbor.ByteStringBase16Encoding, ByteStringEmbeddedCBOR: true}.DiagMode()
		require.NoError(t, err)
		s, err := dm.Diagnose(b)
		require.NoError(t, err)
		return s
	}
	var frame bytes.Buffer
	require.NoError(t, WriteFrame(&frame, FrameRecord, raw))
	rej, err := EncodeReject(ReasonReplay, "sequence 7 already admitted on this session")
	require.NoError(t, err)
	dg, err := AppendDatagramHeader(nil, 42)
	require.NoError(t, err)

	var out strings.Builder
	fmt.Fprintf(&out, "agent public key: %x\nexternal AAD (exporter value): %x\n\n", []byte(pub), session)
	fmt.Fprintf(&out, "claims (%d bytes):\n%s\n\n%s\n\n", len(payload), wrapHex(payload), diag(payload))
	fmt.Fprintf(&out, "record (%d bytes):\n%s\n\n%s\n\n", len(raw), wrapHex(raw), diag(raw))
	fmt.Fprintf(&out, "record frame header: %x\n", frame.Bytes()[:FrameHeaderLen])
	fmt.Fprintf(&out, "reject body (%d bytes): %x\n%s\n", len(rej), rej, diag(rej))
	fmt.Fprintf(&out, "datagram header for flow 42: %x\n", dg)
	if os.Getenv("UTE_PROTOCOL_EXAMPLE") != "" {
		fmt.Println(out.String())
	}

	doc, err := os.ReadFile("../../docs/protocol.md")
	if os.IsNotExist(err) {
		t.Skip("docs/protocol.md not present")
	}
	require.NoError(t, err)
	require.Contains(t, string(doc), wrapHex(raw), "docs/protocol.md example is stale: run UTE_PROTOCOL_EXAMPLE=1 go test -run TestProtocolExample ./overlay/dtl and paste")
}

func wrapHex(b []byte) string {
	h := hex.EncodeToString(b)
	var lines []string
	for len(h) > 96 {
		lines = append(lines, h[:96])
		h = h[96:]
	}
	return strings.Join(append(lines, h), "\n")
}
