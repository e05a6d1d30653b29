package node

import (
	"context"
	"crypto/sha256"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/authority"
	"github.com/ute-project/ute/node/state"
)

// lossyRelay forwards UDP between one client and the authority at upstream, and drops every
// packet from the authority once lost() is true: with lost reporting that the authority committed
// the join, the answer (written after the commit) never reaches the node, as when a connection
// drops at the worst moment.
func lossyRelay(t *testing.T, upstream string, lost func() bool) string {
	t.Helper()
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	up, err := net.ResolveUDPAddr("udp", upstream)
	require.NoError(t, err)
	back, err := net.DialUDP("udp", nil, up)
	require.NoError(t, err)
	var (
		mu     sync.Mutex
		client *net.UDPAddr
		wg     sync.WaitGroup
	)
	wg.Go(func() {
		buf := make([]byte, 64<<10)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			mu.Lock()
			client = from
			mu.Unlock()
			_, _ = back.Write(buf[:n])
		}
	})
	wg.Go(func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			if lost() {
				continue
			}
			mu.Lock()
			to := client
			mu.Unlock()
			if to != nil {
				_, _ = front.WriteToUDP(buf[:n], to)
			}
		}
	})
	t.Cleanup(func() {
		_ = front.Close()
		_ = back.Close()
		wg.Wait()
	})
	return front.LocalAddr().String()
}

type joinRetryEnv struct {
	ta    *testAuthority
	token string
	tokID string
	dir   string
	fp    []byte
}

func newJoinRetryEnv(t *testing.T) *joinRetryEnv {
	t.Helper()
	ta := startAuthority(t)
	tok, err := ta.CreateToken(context.Background(), authority.TokenSpec{Zones: []string{"payments"}, TTL: time.Hour})
	require.NoError(t, err)
	fp := sha256.Sum256([]byte("n1"))
	return &joinRetryEnv{ta: ta, token: tok.Token, tokID: tok.ID, dir: filepath.Join(t.TempDir(), "n1"), fp: fp[:]}
}

func (e *joinRetryEnv) join(ctx context.Context, addr, token string) (*state.Dir, error) {
	return Join(ctx, JoinParams{Dir: e.dir, Authority: addr, Token: token, Name: "n1", HostFingerprint: e.fp})
}

// joinLosingAnswer runs a join whose answer is lost after the authority committed it, and checks
// that the failure kept the staged key and the directory.
func (e *joinRetryEnv) joinLosingAnswer(t *testing.T) {
	t.Helper()
	relay := lossyRelay(t, e.ta.addr, func() bool {
		rec, err := e.ta.Store().Token(e.tokID)
		return err == nil && rec.ConsumedBy != ""
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := e.join(ctx, relay, e.token)
	require.Error(t, err)
	assert.NotErrorIs(t, err, authority.ErrRequestNotSent)
	assert.ErrorContains(t, err, "run the same join again with the same token and --dir")
	rec, err := e.ta.Store().Token(e.tokID)
	require.NoError(t, err)
	require.Equal(t, "n1", rec.ConsumedBy, "the authority committed the join the node never heard of")

	staged := state.JoinKeyFile(e.dir, e.tokID)
	require.FileExists(t, staged, "an ambiguous failure keeps the staged key")
	st, err := os.Stat(staged)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	assert.NoFileExists(t, filepath.Join(e.dir, state.FileNodeCert))
}

// The operator's side of a lost join answer: the join fails, the staged key and the directory
// stay, and running the same join again completes into a working directory holding the
// certificate the authority issued the first time, for the staged key.
func TestJoinRetryAfterLostAnswerCompletes(t *testing.T) {
	e := newJoinRetryEnv(t)
	e.joinLosingAnswer(t)
	staged, err := identity.ReadKey(state.JoinKeyFile(e.dir, e.tokID))
	require.NoError(t, err)
	issued, err := e.ta.Store().Issued()
	require.NoError(t, err)
	require.Len(t, issued, 1)

	d, err := e.join(context.Background(), e.ta.addr, e.token)
	require.NoError(t, err)
	cert, key, err := d.NodeIdentity()
	require.NoError(t, err)
	assert.True(t, key.Equal(staged), "node.key is the key staged before the first attempt")
	assert.Equal(t, issued[0].Serial, cert.Serial().Uint64(), "the certificate issued the first time")
	_, _, err = d.NodeIssuer()
	require.NoError(t, err, "the issuing certificate belongs to the node certificate and key")
	assert.NoFileExists(t, state.JoinKeyFile(e.dir, e.tokID), "the completed join consumed the staged key")
	recs, err := e.ta.Audit()
	require.NoError(t, err)
	assert.Equal(t, authority.OutcomeResent, recs[len(recs)-1].Outcome)

	// The directory works: the node opens with it.
	n, err := Open(context.Background(), Config{Dir: e.dir})
	require.NoError(t, err)
	require.NoError(t, n.Close())

	// A completed directory is refused as before, and keeps its identity.
	_, err = e.join(context.Background(), e.ta.addr, e.token)
	require.ErrorIs(t, err, state.ErrAlreadyJoined)
	assert.FileExists(t, filepath.Join(e.dir, state.FileNodeCert))
}

// After a lost answer the key stays staged for that token: a join with another token is refused
// (the first may have completed), and a retry that the authority refuses for good (its
// certificate was revoked meanwhile) drops the staged key.
func TestJoinPendingKeyIsKeptUntilRefusedForGood(t *testing.T) {
	e := newJoinRetryEnv(t)
	e.joinLosingAnswer(t)

	other, err := e.ta.CreateToken(context.Background(), authority.TokenSpec{Zones: []string{"payments"}, TTL: time.Hour})
	require.NoError(t, err)
	_, err = e.join(context.Background(), e.ta.addr, other.Token)
	require.ErrorIs(t, err, state.ErrJoinPending)
	assert.FileExists(t, state.JoinKeyFile(e.dir, e.tokID))

	issued, err := e.ta.Store().Issued()
	require.NoError(t, err)
	require.Len(t, issued, 1)
	require.NoError(t, e.ta.Revoke(issued[0].Serial, "test"))
	_, err = e.join(context.Background(), e.ta.addr, e.token)
	require.ErrorIs(t, err, authority.ErrTokenUsed)
	assert.NoFileExists(t, state.JoinKeyFile(e.dir, e.tokID), "refused for good: the key can collect nothing")
	assert.NoFileExists(t, filepath.Join(e.dir, state.FileNodeCert))

	// Now the directory joins with another token.
	_, err = e.join(context.Background(), e.ta.addr, other.Token)
	require.ErrorIs(t, err, authority.ErrNameRevoked, "the revoked name stays closed; the staged-key check passed")
	assert.NoFileExists(t, state.JoinKeyFile(e.dir, other.ID))
}

// A join refused for good leaves nothing it created behind: no directory, or, in a directory
// that existed, no staged key. A join whose request never left leaves nothing either.
func TestJoinRefusedLeavesNoDirectory(t *testing.T) {
	e := newJoinRetryEnv(t)
	wrong, err := identity.NewToken(e.ta.Pin()) // the right pin, a token the authority never made
	require.NoError(t, err)
	_, err = e.join(context.Background(), e.ta.addr, wrong.String())
	require.ErrorIs(t, err, authority.ErrTokenUnknown)
	assert.NoDirExists(t, e.dir)

	require.NoError(t, os.MkdirAll(e.dir, 0o700))
	_, err = e.join(context.Background(), e.ta.addr, wrong.String())
	require.ErrorIs(t, err, authority.ErrTokenUnknown)
	assert.DirExists(t, e.dir, "a directory this join did not create is kept")
	assert.NoFileExists(t, state.JoinKeyFile(e.dir, wrong.ID))
	require.NoError(t, os.RemoveAll(e.dir))

	// Nothing listens: the request never left, the fresh key was shown to no one.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = silent.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = e.join(ctx, silent.LocalAddr().String(), e.token)
	require.ErrorIs(t, err, authority.ErrRequestNotSent)
	assert.NoDirExists(t, e.dir)

	// The token is still good.
	_, err = e.join(context.Background(), e.ta.addr, e.token)
	require.NoError(t, err)
}

// A retry whose secret was mistyped says nothing about the attempt that had it right: the staged
// key stays.
func TestJoinRetryWithWrongSecretKeepsStagedKey(t *testing.T) {
	e := newJoinRetryEnv(t)
	e.joinLosingAnswer(t)
	tok, err := identity.ParseToken(e.token)
	require.NoError(t, err)
	tok.Secret[0] ^= 1
	_, err = e.join(context.Background(), e.ta.addr, tok.String())
	require.ErrorIs(t, err, authority.ErrTokenUnknown)
	assert.FileExists(t, state.JoinKeyFile(e.dir, e.tokID))

	_, err = e.join(context.Background(), e.ta.addr, e.token)
	require.NoError(t, err)
}
