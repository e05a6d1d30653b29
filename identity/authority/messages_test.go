package authority

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ute-project/ute/identity"
)

// An impostor at the token's address: the refusal names the pin the token carries and the key
// the server showed, and none of the QUIC/TLS wrapping ("CRYPTO_ERROR 0x12a (local):").
func TestJoinPinMismatchNamesExpectedAndPresentedKeys(t *testing.T) {
	clock := newTestClock()
	real := startAuthority(t, clock)
	impostor := startAuthority(t, clock)
	tok := real.token(t, TokenSpec{Zones: []string{"payments"}})
	parsed, err := identity.ParseToken(tok)
	require.NoError(t, err)

	p := joinParams(t, real, tok, "n1", clock)
	p.Addr = impostor.addr
	_, err = Join(context.Background(), p)
	require.ErrorIs(t, err, ErrPinMismatch)
	want := "authority key does not match the token's pin: the token pins authority key " + parsed.Pin +
		", but the server at " + impostor.addr + " presented key " + identity.KeyHash(impostor.Certificate().PublicKey()) +
		"; check --authority, or ask this authority's operator for a token"
	assert.Equal(t, want, err.Error())
	assert.NotEqual(t, parsed.Pin, identity.KeyHash(impostor.Certificate().PublicKey()), "two different keys")
}

// Nothing answers at the address: the error says where and how long we waited, is ErrNoAnswer
// and ErrRequestNotSent (so a caller knows the token was never shown), and still matches the
// underlying deadline.
func TestJoinNoAnswerSaysWhereAndHowLong(t *testing.T) {
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = silent.Close() })
	clock := newTestClock()
	real := startAuthority(t, clock)
	tok := real.token(t, TokenSpec{Zones: []string{"payments"}})
	p := joinParams(t, real, tok, "n1", clock)
	p.Addr = silent.LocalAddr().String()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = Join(ctx, p)
	require.ErrorIs(t, err, ErrNoAnswer)
	require.ErrorIs(t, err, ErrRequestNotSent)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, "no authority answered at "+p.Addr+" within 0.3 s: check the address and that `ute authority run` listens there (UDP) "+
		"and is not blocked by a firewall", err.Error())

	// The token was never shown: it still joins at the real authority.
	_, err = Join(context.Background(), joinParams(t, real, tok, "n1", clock))
	require.NoError(t, err)
}

// A refusal that came back from the authority is neither "no answer" nor "not sent".
func TestRefusalIsNotMarkedNotSent(t *testing.T) {
	clock := newTestClock()
	real := startAuthority(t, clock)
	tok := real.token(t, TokenSpec{Zones: []string{"payments"}})
	_, err := Join(context.Background(), joinParams(t, real, tok, "n1", clock))
	require.NoError(t, err)
	_, err = Join(context.Background(), joinParams(t, real, tok, "n2", clock))
	require.ErrorIs(t, err, ErrTokenUsed)
	assert.NotErrorIs(t, err, ErrRequestNotSent)
	assert.NotErrorIs(t, err, ErrNoAnswer)
}

func TestHumanSeconds(t *testing.T) {
	assert.Equal(t, "5 s", humanSeconds(5*time.Second))
	assert.Equal(t, "1.5 s", humanSeconds(1493*time.Millisecond))
	assert.Equal(t, "0.3 s", humanSeconds(299*time.Millisecond))
}
