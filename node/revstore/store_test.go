package revstore

import (
	"bytes"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/identity/record"
)

func TestAddIsDurableAcrossReopen(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0.Add(time.Minute)}
	path := storePath(t)
	s, rep, err := Open(path, Options{Verifier: p.v, Now: clk.Now})
	require.NoError(t, err)
	assert.Zero(t, rep.Loaded)

	a := p.agent(t, "billing", t0.Add(time.Hour))
	agentRaw, err := record.SignRevocation(record.AgentRevocation(p.n1, p.i1, a, "drift", t0), p.n1Key)
	require.NoError(t, err)
	for _, raw := range [][]byte{p.byAuthority(t, p.n2.ID.String(), 4, 24*time.Hour), p.byAuthority(t, serial(9), 2, time.Hour), agentRaw} {
		_, changed, err := s.Add(raw)
		require.NoError(t, err)
		require.True(t, changed)
	}
	_, changed, err := s.SetPolicy(p.policy(t, 3, "zones: []\n"))
	require.NoError(t, err)
	require.True(t, changed)
	require.NoError(t, s.Close())

	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())

	s, rep = open(t, path, p, clk)
	assert.Equal(t, 3, rep.Loaded)
	assert.Empty(t, rep.Quarantined)
	assert.Equal(t, uint64(3), rep.PolicyVersion)
	assert.Equal(t, 3, s.Len())
	assert.Equal(t, uint64(4), s.MaxSeq())
	assert.True(t, s.Revoked(p.n2.ID.String()))
	assert.True(t, s.Revoked("serial:9"))
	assert.True(t, s.Revoked(record.ChainKeys(p.n1, a)...), "the agent certificate's chain")
	assert.False(t, s.Revoked(record.ChainKeys(p.n1, p.agent(t, "billing", t0.Add(time.Hour)))...), "another certificate of the same agent")
	assert.False(t, s.Revoked(p.n1.ID.String()))
	raw, version := s.Policy()
	assert.Equal(t, uint64(3), version)
	assert.NotEmpty(t, raw)
	all := s.All()
	require.Len(t, all, 3)
	for _, e := range all {
		assert.Equal(t, clk.Now().UnixMilli(), e.Arrived.UnixMilli())
		assert.Equal(t, time.Minute, e.AgeAtArrival())
	}
	assert.Len(t, s.Raw(), 3)
}

func TestAddIsIdempotentByKey(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	s, _ := open(t, storePath(t), p, clk)
	first := p.byAuthority(t, p.n1.ID.String(), 1, time.Hour)
	r, changed, err := s.Add(first)
	require.NoError(t, err)
	require.True(t, changed)
	assert.Equal(t, p.n1.ID.String(), r.Key())

	_, changed, err = s.Add(first)
	require.NoError(t, err)
	assert.False(t, changed, "the same bytes again")

	resigned := p.byAuthority(t, p.n1.ID.String(), 1, time.Hour)
	_, changed, err = s.Add(resigned)
	require.NoError(t, err)
	assert.False(t, changed, "the same revocation signed again is the same revocation")

	self, err := record.SignRevocation(record.NodeRevocation(p.n1, "me", t0), p.n1Key)
	require.NoError(t, err)
	_, changed, err = s.Add(self) // expires with n1's certificate at t0+24h: later, so it supersedes
	require.NoError(t, err)
	assert.True(t, changed)
	e, ok := s.Lookup(p.n1.ID.String())
	require.True(t, ok)
	assert.False(t, e.Record.ByAuthority())
	assert.Equal(t, 1, s.Len())

	// Equal expiry: the authority's record replaces the node's; never the reverse.
	same := p.byAuthority(t, p.n1.ID.String(), 2, 24*time.Hour)
	_, changed, err = s.Add(same)
	require.NoError(t, err)
	assert.True(t, changed)
	_, changed, err = s.Add(self)
	require.NoError(t, err)
	assert.False(t, changed)
	e, _ = s.Lookup(p.n1.ID.String())
	assert.True(t, e.Record.ByAuthority())
	assert.Equal(t, uint64(2), s.MaxSeq())

	// A shorter one never shortens the held one.
	_, changed, err = s.Add(p.byAuthority(t, p.n1.ID.String(), 3, time.Minute))
	require.NoError(t, err)
	assert.False(t, changed)
	e, _ = s.Lookup(p.n1.ID.String())
	assert.True(t, e.Record.Claims.Expires.Equal(t0.Add(24*time.Hour)))
	assert.Equal(t, 1, s.Len())
}

func TestRefusedRecordsAreNotStored(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	s, _ := open(t, path, p, clk)
	good := p.byAuthority(t, p.n1.ID.String(), 1, time.Hour)
	forged := bytes.Clone(good)
	forged[len(forged)-1] ^= 1
	otherNode, err := record.SignRevocation(record.RevocationClaims{TrustDomain: testTD, Subject: p.n2.ID.String(), Reason: "x",
		IssuedAt: t0, Expires: p.n2.X509.NotAfter, Signer: p.n2.ID.String(), SignerCert: p.n2.Raw()}, p.n2Key)
	require.NoError(t, err)
	_, _, err = s.Add(otherNode) // n2 revoking itself is fine ...
	require.NoError(t, err)

	for name, tc := range map[string]struct {
		raw  []byte
		want error
	}{
		"forged signature": {forged, record.ErrSignature},
		"garbage":          {[]byte("not a record"), record.ErrMalformed},
		"oversized":        {make([]byte, record.MaxRevocationSize+1), record.ErrTooLarge},
	} {
		t.Run(name, func(t *testing.T) {
			_, changed, err := s.Add(tc.raw)
			require.ErrorIs(t, err, tc.want)
			assert.False(t, changed)
		})
	}
	_, _, err = s.SetPolicy(good)
	require.ErrorIs(t, err, record.ErrMalformed, "a revocation is not a policy release")
	short := p.byAuthority(t, serial(5), 1, time.Minute)
	clk.Set(t0.Add(time.Minute + time.Millisecond))
	_, _, err = s.Add(short)
	require.ErrorIs(t, err, record.ErrExpired)
	assert.Equal(t, 1, s.Len())
	assert.False(t, s.Revoked(p.n1.ID.String(), serial(5)))
}

func TestPruneDropsOnlyExpired(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	s, _ := open(t, path, p, clk)
	for i := 1; i <= 10; i++ {
		_, _, err := s.Add(p.byAuthority(t, serial(i), uint64(i), time.Duration(i)*time.Hour))
		require.NoError(t, err)
	}
	n, err := s.Prune(t0.Add(3 * time.Hour))
	require.NoError(t, err)
	assert.Equal(t, 2, n, "serials 1 and 2 expired; serial 3 expires exactly now and stays")
	assert.Equal(t, 8, s.Len())
	assert.True(t, s.Revoked(serial(3)))
	assert.False(t, s.Revoked(serial(2)))
	n, err = s.Prune(t0.Add(3 * time.Hour))
	require.NoError(t, err)
	assert.Zero(t, n)
	require.NoError(t, s.Close())

	clk.Set(t0.Add(5*time.Hour + time.Second))
	s, rep := open(t, path, p, clk)
	assert.Equal(t, 3, rep.Expired, "serials 3..5 expired while the node was down")
	assert.Equal(t, 5, rep.Loaded)
	assert.Equal(t, 5, s.Len())
	assert.Equal(t, uint64(10), s.MaxSeq())

	_, err = s.Prune(t0.Add(11 * time.Hour))
	require.NoError(t, err)
	assert.Zero(t, s.Len())
	assert.Zero(t, s.MaxSeq())
	require.NoError(t, s.Close())
	_, err = s.Prune(t0)
	require.ErrorIs(t, err, ErrClosed)
	_, _, err = s.Add(p.byAuthority(t, serial(1), 1, time.Hour))
	require.ErrorIs(t, err, ErrClosed)
}

func TestPolicyVersionsOnlyMoveForward(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	s, _ := open(t, path, p, clk)
	raw, v := s.Policy()
	assert.Nil(t, raw)
	assert.Zero(t, v)

	v2 := p.policy(t, 2, "zones: [two]\n")
	_, changed, err := s.SetPolicy(v2)
	require.NoError(t, err)
	require.True(t, changed)
	_, changed, err = s.SetPolicy(p.policy(t, 2, "zones: [two]\n"))
	require.NoError(t, err)
	assert.False(t, changed, "the held release again, re-signed")
	_, _, err = s.SetPolicy(p.policy(t, 1, "zones: [one]\n"))
	require.ErrorIs(t, err, ErrStalePolicy)
	_, _, err = s.SetPolicy(p.policy(t, 2, "zones: [other]\n"))
	require.ErrorIs(t, err, ErrStalePolicy)
	byNode, err := record.SignPolicy(record.PolicyClaims{TrustDomain: testTD, PolicyVersion: 9, IssuedAt: t0, Policy: []byte("x")}, p.n1Key)
	require.NoError(t, err)
	_, _, err = s.SetPolicy(byNode)
	require.ErrorIs(t, err, record.ErrSignature)
	_, v = s.Policy()
	assert.Equal(t, uint64(2), v)
	require.NoError(t, s.Close())

	s, rep := open(t, path, p, clk)
	assert.Equal(t, uint64(2), rep.PolicyVersion)
	_, _, err = s.SetPolicy(p.policy(t, 1, "zones: [one]\n"))
	require.ErrorIs(t, err, ErrStalePolicy, "a replayed older release is refused after a restart too")
	rel, changed, err := s.SetPolicy(p.policy(t, 3, "zones: [three]\n"))
	require.NoError(t, err)
	assert.True(t, changed)
	assert.Equal(t, "zones: [three]\n", string(rel.Claims.Policy))
	assert.Equal(t, rel, s.PolicyRelease())
}

func TestPerNodeLimit(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	s, _, err := Open(storePath(t), Options{Verifier: p.v, Now: clk.Now, MaxPerNode: 2})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	for i := range 3 {
		a := p.agent(t, "a"+string(rune('a'+i)), t0.Add(time.Hour))
		raw, err := record.SignRevocation(record.AgentRevocation(p.n1, p.i1, a, "x", t0), p.n1Key)
		require.NoError(t, err)
		_, changed, err := s.Add(raw)
		if i < 2 {
			require.NoError(t, err)
			require.True(t, changed)
			continue
		}
		require.ErrorIs(t, err, ErrLimit)
	}
	self, err := record.SignRevocation(record.NodeRevocation(p.n2, "x", t0), p.n2Key)
	require.NoError(t, err)
	_, _, err = s.Add(self)
	require.NoError(t, err, "another node is not affected")
	for i := 1; i <= 5; i++ {
		_, _, err := s.Add(p.byAuthority(t, serial(i), uint64(i), time.Hour))
		require.NoError(t, err, "authority records are never capped")
	}
	assert.Equal(t, 8, s.Len())
}

func TestConcurrentAdd(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	s, _ := open(t, path, p, clk)
	const distinct, workers = 40, 8
	raws := make([][]byte, distinct)
	for i := range raws {
		raws[i] = p.byAuthority(t, serial(i+1), uint64(i+1), time.Hour)
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		changed = map[string]int{}
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range distinct {
				raw := raws[(i+w*5)%distinct]
				r, ok, err := s.Add(raw)
				if !assert.NoError(t, err) {
					return
				}
				assert.True(t, s.Revoked(r.Key()), "in force once Add returned")
				if ok {
					mu.Lock()
					changed[r.Key()]++
					mu.Unlock()
				}
				_ = s.Len()
				_ = s.Raw()
			}
		}()
	}
	wg.Wait()
	require.Len(t, changed, distinct)
	for k, n := range changed {
		assert.Equal(t, 1, n, "%s reported new %d times", k, n)
	}
	require.NoError(t, s.Close())
	s, rep := open(t, path, p, clk)
	assert.Equal(t, distinct, rep.Loaded)
	assert.Equal(t, uint64(distinct), s.MaxSeq())
}

func TestSecondOpenIsRefusedWhileLocked(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	_, _ = open(t, path, p, clk)
	_, _, err := Open(path, Options{Verifier: p.v, Now: clk.Now, LockTimeout: 50 * time.Millisecond})
	require.ErrorIs(t, err, ErrLocked)
}

func TestOpenNeedsAnAnchor(t *testing.T) {
	_, _, err := Open(storePath(t), Options{})
	require.ErrorIs(t, err, record.ErrSigner)
}

// rawPut writes a value into the store file directly, as an attacker with file access would.
func rawPut(t *testing.T, path string, bucket, key, value []byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucket)
		if err != nil {
			return err
		}
		return b.Put(key, value)
	}))
	require.NoError(t, db.Close())
}

func rawGet(t *testing.T, path string, bucket, key []byte) []byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, db.Close()) }()
	var v []byte
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		v = bytes.Clone(tx.Bucket(bucket).Get(key))
		return nil
	}))
	return v
}

func encodeStored(t *testing.T, raw []byte) []byte {
	t.Helper()
	v, err := encMode.Marshal(stored{Raw: raw, Arrived: t0.UnixMilli()})
	require.NoError(t, err)
	return v
}

func TestTamperedFileNeitherInjectsNorSilentlyLoses(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	path := storePath(t)
	s, _, err := Open(path, Options{Verifier: p.v, Now: clk.Now})
	require.NoError(t, err)
	for i := 1; i <= 3; i++ {
		_, _, err := s.Add(p.byAuthority(t, serial(i), uint64(i), time.Hour))
		require.NoError(t, err)
	}
	_, _, err = s.SetPolicy(p.policy(t, 5, "zones: []\n"))
	require.NoError(t, err)
	require.NoError(t, s.Close())

	// 1. A held record's signature flipped on disk.
	v := rawGet(t, path, bucketRevocations, []byte(serial(2)))
	var st stored
	require.NoError(t, decMode.Unmarshal(v, &st))
	st.Raw[len(st.Raw)-1] ^= 1
	rawPut(t, path, bucketRevocations, []byte(serial(2)), encodeStored(t, st.Raw))
	// 2. A forged record injected: authority-shaped, signed by a rogue key.
	rogue := &pki{authKey: mustKey(t)}
	forged, err := record.SignRevocation(record.RevocationClaims{TrustDomain: testTD, Subject: p.n1.ID.String(), Reason: "x",
		IssuedAt: t0, Expires: t0.Add(time.Hour), Signer: identity.AuthorityID(testTD).String(), Seq: 99}, rogue.authKey)
	require.NoError(t, err)
	rawPut(t, path, bucketRevocations, []byte(p.n1.ID.String()), encodeStored(t, forged))
	// 3. An undecodable value.
	rawPut(t, path, bucketRevocations, []byte("junk\x00\x01"), []byte{0xff, 0x00})
	// 4. An authentic record filed under another key.
	moved := p.byAuthority(t, serial(7), 7, time.Hour)
	rawPut(t, path, bucketRevocations, []byte("serial:8"), encodeStored(t, moved))
	// 5. The policy release replaced by a forged newer one.
	forgedPolicy, err := record.SignPolicy(record.PolicyClaims{TrustDomain: testTD, PolicyVersion: 6, IssuedAt: t0, Policy: []byte("evil")}, rogue.authKey)
	require.NoError(t, err)
	rawPut(t, path, bucketPolicy, keyCurrent, encodeStored(t, forgedPolicy))

	s, rep := open(t, path, p, clk)
	require.Len(t, rep.Quarantined, 4)
	var why []error
	for _, q := range rep.Quarantined {
		why = append(why, q.Err)
	}
	assertSomeIs(t, why, record.ErrSignature)
	assertSomeIs(t, why, ErrCorrupt)
	assert.Equal(t, 1, rep.Rekeyed)
	assert.Equal(t, 4, rep.QuarantineTotal)
	assert.False(t, s.Revoked(p.n1.ID.String()), "the forged record is not applied")
	assert.False(t, s.Revoked(serial(2)), "the damaged record cannot be told from a forgery; it is reported, not applied")
	assert.True(t, s.Revoked(serial(1), serial(3)))
	assert.True(t, s.Revoked(serial(7)), "the authentic record is kept under its own key")
	assert.False(t, s.Revoked(serial(8)))
	assert.Equal(t, 3, rep.Loaded)
	assert.Zero(t, rep.PolicyVersion, "no policy rather than a forged one: the node fails closed until it gets a valid one")
	raw, _ := s.Policy()
	assert.Nil(t, raw)
	require.NoError(t, s.Close())

	// Reopening again changes nothing and reports nothing new: the evidence stays quarantined.
	s, rep = open(t, path, p, clk)
	assert.Empty(t, rep.Quarantined)
	assert.Equal(t, 4, rep.QuarantineTotal)
	assert.Equal(t, 3, rep.Loaded)
	assert.Zero(t, rep.Rekeyed)
	assert.False(t, s.Revoked(p.n1.ID.String(), serial(2)))

	// The lost revocation comes back the way it would from gossip, and the older policy too.
	_, changed, err := s.Add(p.byAuthority(t, serial(2), 2, time.Hour))
	require.NoError(t, err)
	assert.True(t, changed)
	_, changed, err = s.SetPolicy(p.policy(t, 5, "zones: []\n"))
	require.NoError(t, err)
	assert.True(t, changed)
}

func assertSomeIs(t *testing.T, errs []error, target error) {
	t.Helper()
	for _, err := range errs {
		if errors.Is(err, target) {
			return
		}
	}
	t.Errorf("no error matches %v among %v", target, errs)
}

func TestCorruptFileIsAClearError(t *testing.T) {
	p := newPKI(t)
	clk := &clock{t: t0}
	garbage := storePath(t)
	require.NoError(t, os.WriteFile(garbage, bytes.Repeat([]byte("not a database "), 2000), 0o600))
	_, _, err := Open(garbage, Options{Verifier: p.v, Now: clk.Now})
	require.ErrorIs(t, err, ErrCorrupt)
	assert.NotContains(t, err.Error(), "\n")

	// A real store with its pages overwritten at many offsets: each open either refuses with
	// ErrCorrupt or opens with only verified records applied; none panics.
	path := storePath(t)
	s, _, err := Open(path, Options{Verifier: p.v, Now: clk.Now})
	require.NoError(t, err)
	for i := 1; i <= 50; i++ {
		_, _, err := s.Add(p.byAuthority(t, serial(i), uint64(i), time.Hour))
		require.NoError(t, err)
	}
	require.NoError(t, s.Close())
	pristine, err := os.ReadFile(path)
	require.NoError(t, err)
	var refused, opened int
	for off := 0; off < len(pristine); off += 1531 {
		damaged := bytes.Clone(pristine)
		for i := off; i < min(off+97, len(damaged)); i++ {
			damaged[i] ^= 0x5a
		}
		p2 := storePath(t)
		require.NoError(t, os.WriteFile(p2, damaged, 0o600))
		s, rep, err := Open(p2, Options{Verifier: p.v, Now: clk.Now})
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt, "offset %d", off)
			refused++
			continue
		}
		opened++
		for _, e := range s.All() {
			_, err := p.v.VerifyRevocation(e.Record.Raw(), clk.Now())
			require.NoError(t, err)
		}
		assert.Equal(t, rep.Loaded, s.Len())
		require.NoError(t, s.Close())
	}
	assert.NotZero(t, refused, "some damage must be detected as corruption")
	t.Logf("damaged copies: %d refused as corrupt, %d opened with only verified records", refused, opened)
}

// TestHeldIsWhenTheCopyTookEffect: Held is read after the durable write (a later reading of the
// clock than Arrived, which precedes verification), and a record loaded at Open is held from
// that Open, while its Arrived stays the persisted first arrival.
func TestHeldIsWhenTheCopyTookEffect(t *testing.T) {
	p := newPKI(t)
	var mu sync.Mutex
	calls := 0
	stepping := func() time.Time { // every reading a millisecond after the last
		mu.Lock()
		defer mu.Unlock()
		calls++
		return t0.Add(time.Duration(calls) * time.Millisecond)
	}
	path := storePath(t)
	s, _, err := Open(path, Options{Verifier: p.v, Now: stepping})
	require.NoError(t, err)
	r, changed, err := s.Add(p.byAuthority(t, p.n2.ID.String(), 1, time.Hour))
	require.NoError(t, err)
	require.True(t, changed)
	e, ok := s.Lookup(r.Key())
	require.True(t, ok)
	require.False(t, e.Held.IsZero())
	assert.True(t, e.Held.After(e.Arrived), "held %v, arrived %v", e.Held, e.Arrived)
	require.NoError(t, s.Close())

	clk := &clock{t: t0.Add(time.Hour)}
	s, _ = open(t, path, p, clk)
	e, ok = s.Lookup(r.Key())
	require.True(t, ok)
	assert.Equal(t, t0.Add(time.Hour), e.Held)
	assert.True(t, e.Arrived.Before(t0.Add(time.Second)), "arrived %v is the persisted first arrival", e.Arrived)
}
