package authority

import (
	"bytes"
	"crypto/ed25519"
	"testing"

	"github.com/stretchr/testify/require"
)

func FuzzJoinRequest(f *testing.F) {
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32))
	csr, err := createCSR(key, "n1", "", fingerprint("n1"))
	require.NoError(f, err)
	icsr, err := createIssuerCSR(key, "n1", "", fingerprint("n1"))
	require.NoError(f, err)
	valid, err := wireEnc.Marshal(JoinRequest{TokenID: "abcdefghijklmnop", Secret: bytes.Repeat([]byte{1}, 32), CSR: csr, IssuerCSR: icsr, Region: "eu-west-1"})
	require.NoError(f, err)
	f.Add(valid)
	f.Add([]byte{})
	f.Add([]byte{0xa0})
	f.Add([]byte{0xbf, 0x01, 0x60, 0xff})                   // indefinite-length map
	f.Add([]byte{0xa2, 0x01, 0x61, 0x61, 0x01, 0x61, 0x62}) // duplicate key
	f.Add([]byte{0xa1, 0x18, 0x63, 0x00})                   // unknown field 99
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeJoinRequest(b)
		if err != nil {
			require.Zero(t, req.TokenID)
			return
		}
		require.NotEmpty(t, req.TokenID)
		require.LessOrEqual(t, len(req.CSR), maxCSR)
		// The decoded CSR goes straight into the server's CSR check: it must refuse or accept
		// cleanly, and an accepted CSR must carry a valid name and a 32-byte fingerprint.
		if info, err := parseCSR(req.CSR); err == nil {
			require.Len(t, info.Fingerprint, fingerprintLen)
			require.NotEmpty(t, info.Name)
		}
	})
}

func FuzzCSR(f *testing.F) {
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
	csr, err := createCSR(key, "node-1", "", fingerprint("h"))
	require.NoError(f, err)
	f.Add(csr)
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{3}, 32)).Public().(ed25519.PublicKey)
	f.Add(bytes.Replace(csr, key.Public().(ed25519.PublicKey), other, 1))
	f.Add(csr[:len(csr)/2])
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := parseCSR(b)
		if err != nil {
			require.ErrorIs(t, err, ErrCSR)
			return
		}
		require.Len(t, info.PublicKey, ed25519.PublicKeySize)
		require.Len(t, info.Fingerprint, fingerprintLen)
	})
}

func FuzzResponse(f *testing.F) {
	ok, err := wireEnc.Marshal(Response{Code: CodeOK, NodeCert: []byte{1}, AuthorityCert: []byte{2}, Policy: []byte("zones: []")})
	require.NoError(f, err)
	refused, err := wireEnc.Marshal(Response{Code: CodeTokenUsed, Message: "join token already used"})
	require.NoError(f, err)
	withMembers, err := wireEnc.Marshal(Response{Code: CodeOK, NodeCert: []byte{1}, AuthorityCert: []byte{2}, PolicyRelease: []byte{3},
		Members: []Member{{ID: "spiffe://acme.internal/node/n1", Addr: "127.0.0.1:7946", Zones: []string{"payments"}}}})
	require.NoError(f, err)
	f.Add(ok)
	f.Add(refused)
	f.Add(withMembers)
	f.Add([]byte{0xa1, 0x01, 0x18, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		resp, err := DecodeResponse(b)
		if err != nil {
			return
		}
		if resp.Code != CodeOK {
			require.Error(t, errOf(resp.Code, resp.Message))
		}
	})
}

func FuzzWatchRequest(f *testing.F) {
	valid, err := wireEnc.Marshal(WatchRequest{SinceSeq: 7, PolicyVersion: 2})
	require.NoError(f, err)
	f.Add(valid)
	f.Add([]byte{0xa0})
	f.Add([]byte{})
	f.Add([]byte{0xa1, 0x01, 0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) // since = 2^64-1
	f.Add([]byte{0xa1, 0x01, 0x20})                                                 // negative since
	f.Add([]byte{0xa1, 0x03, 0x00})                                                 // unknown field 3
	f.Add([]byte{0xa2, 0x01, 0x00, 0x01, 0x01})                                     // duplicate key
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeWatchRequest(b)
		if err != nil {
			require.ErrorIs(t, err, ErrProtocol)
			require.Zero(t, req)
			return
		}
		// What decodes re-encodes to a request that decodes to the same values.
		again, err := wireEnc.Marshal(req)
		require.NoError(t, err)
		back, err := DecodeWatchRequest(again)
		require.NoError(t, err)
		require.Equal(t, req, back)
	})
}

func FuzzWatchFrame(f *testing.F) {
	for _, fr := range []WatchFrame{
		{Kind: FrameRevocation, Seq: 1, Body: []byte{0xd2, 0x84}},
		{Kind: FramePolicy, Seq: 3, Body: bytes.Repeat([]byte{1}, 64)},
		{Kind: FrameClose, Code: CodeRevoked, Message: "certificate revoked: serial 7"},
		{Kind: FrameClose},
		{Kind: 9, Seq: 1},
		{Kind: FrameRevocation, Seq: 0, Body: []byte{1}},
		{Kind: FrameRevocation, Seq: 2, Body: []byte{1}, Code: CodeBusy},
	} {
		b, err := wireEnc.Marshal(fr)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Add([]byte{0xa1, 0x01, 0x01})
	f.Add([]byte{0xbf, 0x01, 0x01, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeWatchFrame(b)
		if err != nil {
			require.ErrorIs(t, err, ErrProtocol)
			require.Zero(t, fr.Kind)
			return
		}
		switch fr.Kind {
		case FrameRevocation, FramePolicy:
			require.NotZero(t, fr.Seq)
			require.NotEmpty(t, fr.Body)
			require.Equal(t, CodeOK, fr.Code)
		case FrameClose:
			// A close always maps to an error the watcher can classify.
			require.NotEqual(t, CodeOK, fr.Code)
			require.Error(t, errOf(fr.Code, fr.Message))
		default:
			t.Fatalf("kind %d accepted", fr.Kind)
		}
	})
}
