package authority

import (
	"crypto/sha256"
	"errors"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func openTestStore(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "authority.db")
	s, err := OpenStore(path, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Init("acme.internal", []byte("zones: []\n"), time.Unix(1000, 0)))
	return s, path
}

func hashOf(secret string) []byte { h := sha256.Sum256([]byte(secret)); return h[:] }

func putToken(t *testing.T, s *Store, id, secret string, expires time.Time) {
	t.Helper()
	require.NoError(t, s.PutToken(TokenRecord{
		ID: id, SecretHash: hashOf(secret), Zones: []string{"payments"},
		CreatedAt: time.Unix(1000, 0), ExpiresAt: expires,
	}))
}

func TestStoreInitRefusesSecondInit(t *testing.T) {
	s, _ := openTestStore(t)
	err := s.Init("other.internal", nil, time.Now())
	require.ErrorIs(t, err, ErrAlreadyInitialized)
	meta, err := s.Meta()
	require.NoError(t, err)
	assert.Equal(t, "acme.internal", meta.TrustDomain)
	assert.Equal(t, "zones: []\n", string(meta.Policy))
	assert.Zero(t, meta.LastSerial)
}

func TestStoreMetaUninitialized(t *testing.T) {
	s, err := OpenStore(filepath.Join(t.TempDir(), "a.db"), time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	_, err = s.Meta()
	require.ErrorIs(t, err, ErrNotInitialized)
}

func TestStoreLockedByOtherHandle(t *testing.T) {
	_, path := openTestStore(t)
	_, err := OpenStore(path, 50*time.Millisecond)
	require.ErrorIs(t, err, ErrStoreLocked)
}

func TestStoreConsumeChecks(t *testing.T) {
	now := time.Unix(5000, 0)
	errCheck := errors.New("zone check failed")
	tests := []struct {
		name    string
		id      string
		secret  string
		expires time.Time
		check   func(TokenRecord) ([]SliceRequest, error)
		want    error
	}{
		{"ok", "t1", "s1", now.Add(time.Minute), nil, nil},
		{"unknown id", "nope", "s1", now.Add(time.Minute), nil, ErrTokenUnknown},
		{"wrong secret", "t1", "bad", now.Add(time.Minute), nil, ErrTokenUnknown},
		{"expired", "t1", "s1", now, nil, ErrTokenExpired},
		{"check refuses", "t1", "s1", now.Add(time.Minute), func(TokenRecord) ([]SliceRequest, error) { return nil, errCheck }, errCheck},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTestStore(t)
			putToken(t, s, "t1", "s1", tc.expires)
			got, err := s.Consume(ConsumeRequest{ID: tc.id, SecretHash: hashOf(tc.secret), Consumer: "n1", Now: now, Check: tc.check})
			if tc.want != nil {
				require.ErrorIs(t, err, tc.want)
				stored, err := s.Token("t1")
				require.NoError(t, err)
				assert.Empty(t, stored.ConsumedBy, "a refused attempt must not consume the token")
				meta, err := s.Meta()
				require.NoError(t, err)
				assert.Zero(t, meta.LastSerial, "a refused attempt must not allocate a serial")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, uint64(1), got.Serial)
			assert.Equal(t, "n1", got.Token.ConsumedBy)
			_, err = s.Consume(ConsumeRequest{ID: "t1", SecretHash: hashOf("s1"), Consumer: "n2", Now: now})
			require.ErrorIs(t, err, ErrTokenUsed)
		})
	}
}

// A guesser holding a token id but not its secret must learn nothing about the token: a used or
// expired token answers a wrong secret exactly as an unknown id does, never ErrTokenUsed or
// ErrTokenExpired (docs/architecture.md, "Token checks").
func TestStoreConsumeWrongSecretRevealsNoState(t *testing.T) {
	now := time.Unix(5000, 0)
	s, _ := openTestStore(t)
	putToken(t, s, "used", "s1", now.Add(time.Minute))
	_, err := s.Consume(ConsumeRequest{ID: "used", SecretHash: hashOf("s1"), Consumer: "n1", Now: now})
	require.NoError(t, err)
	putToken(t, s, "expired", "s2", now)

	for _, id := range []string{"used", "expired", "never-created"} {
		t.Run(id, func(t *testing.T) {
			_, err := s.Consume(ConsumeRequest{ID: id, SecretHash: hashOf("guess"), Consumer: "mallory", Now: now})
			require.ErrorIs(t, err, ErrTokenUnknown)
			assert.NotErrorIs(t, err, ErrTokenUsed)
			assert.NotErrorIs(t, err, ErrTokenExpired)
		})
	}
	stored, err := s.Token("used")
	require.NoError(t, err)
	assert.Equal(t, "n1", stored.ConsumedBy, "a guess does not change who consumed the token")
}

func TestStoreConsumeConcurrentExactlyOnce(t *testing.T) {
	s, _ := openTestStore(t)
	putToken(t, s, "t1", "s1", time.Unix(9000, 0))
	const n = 20
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		ok      int
		used    int
		serials []uint64
	)
	for range n {
		wg.Go(func() {
			got, err := s.Consume(ConsumeRequest{ID: "t1", SecretHash: hashOf("s1"), Consumer: "n", Now: time.Unix(5000, 0)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
				serials = append(serials, got.Serial)
			case errors.Is(err, ErrTokenUsed):
				used++
			default:
				t.Errorf("unexpected error: %v", err)
			}
		})
	}
	wg.Wait()
	assert.Equal(t, 1, ok)
	assert.Equal(t, n-1, used)
	assert.Equal(t, []uint64{1}, serials)
}

func TestStoreSerialsSurviveReopen(t *testing.T) {
	s, path := openTestStore(t)
	a, err := s.AllocateSerial()
	require.NoError(t, err)
	b, err := s.AllocateSerial()
	require.NoError(t, err)
	require.Less(t, a, b)
	require.NoError(t, s.Close())
	s2, err := OpenStore(path, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close() })
	c, err := s2.AllocateSerial()
	require.NoError(t, err)
	assert.Greater(t, c, b)
}

func TestStoreRevokeIdempotentAndAudit(t *testing.T) {
	s, _ := openTestStore(t)
	require.NoError(t, s.Revoke(7, "compromised", time.Unix(1, 0)))
	require.NoError(t, s.Revoke(7, "again", time.Unix(2, 0)))
	revoked, err := s.IsRevoked(7)
	require.NoError(t, err)
	assert.True(t, revoked)
	revoked, err = s.IsRevoked(8)
	require.NoError(t, err)
	assert.False(t, revoked)

	require.NoError(t, s.AppendAudit(AuditRecord{Time: time.Unix(3, 0), Event: "join", Outcome: OutcomeRefused, Reason: "x"}))
	require.NoError(t, s.AppendAudit(AuditRecord{Time: time.Unix(4, 0), Event: "join", Outcome: OutcomeIssued, Serial: 3}))
	recs, err := s.Audit()
	require.NoError(t, err)
	require.Len(t, recs, 2)
	assert.Equal(t, uint64(1), recs[0].Seq)
	assert.Equal(t, uint64(2), recs[1].Seq)
	assert.Equal(t, OutcomeIssued, recs[1].Outcome)
}

func TestStorePutIssuedRefusesDuplicateSerial(t *testing.T) {
	s, _ := openTestStore(t)
	rec := IssuedRecord{Serial: 1, SPIFFEID: "spiffe://acme.internal/node/n1", IssuedAt: time.Unix(1, 0)}
	require.NoError(t, s.PutIssued(rec))
	require.Error(t, s.PutIssued(rec))
	got, err := s.Issued()
	require.NoError(t, err)
	require.Len(t, got, 1)
}

func BenchmarkTokenConsume(b *testing.B) {
	path := filepath.Join(b.TempDir(), "authority.db")
	s, err := OpenStore(path, time.Second)
	require.NoError(b, err)
	b.Cleanup(func() { _ = s.Close() })
	require.NoError(b, s.Init("acme.internal", nil, time.Unix(1, 0)))
	secret := hashOf("secret")
	for i := range b.N {
		id := strconv.Itoa(i)
		require.NoError(b, s.PutToken(TokenRecord{ID: id, SecretHash: secret, Zones: []string{"z"}, ExpiresAt: time.Unix(1<<40, 0)}))
	}
	b.ResetTimer()
	for i := range b.N {
		id := strconv.Itoa(i)
		if _, err := s.Consume(ConsumeRequest{ID: id, SecretHash: secret, Consumer: "n", Now: time.Unix(2, 0)}); err != nil {
			b.Fatal(err)
		}
	}
}
