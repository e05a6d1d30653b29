package authority

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/ute-project/ute/identity/record"
	"github.com/ute-project/ute/zones"
)

// Signed records the authority hands out: revocation records (one per revocation that revoked
// something new, numbered by a monotonic sequence) and policy releases (one per policy version).
// Both are stored as the exact signed bytes, so every watcher and every node receives the same
// bytes the authority signed.

var (
	// bucketRevRecords maps a revocation sequence number (u64 BE) to its signed record.
	bucketRevRecords = []byte("revocation_records")
	// bucketRevSubjects maps a canonical subject to the sequence number of its newest record.
	bucketRevSubjects = []byte("revocation_subjects")

	keyRevocationSeq = []byte("revocation_seq")
	keyPolicyVersion = []byte("policy_version")
	keyPolicyRelease = []byte("policy_release")
)

// ErrPolicyInvalid means a policy given to `ute policy apply` does not parse or validate; the
// message names the file and line. Nothing was stored.
var ErrPolicyInvalid = errors.New("policy refused")

// SignedRecord is one stored revocation record: its sequence number and its signed bytes.
type SignedRecord struct {
	Seq uint64
	Raw []byte
}

func nextRevocationSeq(tx *bolt.Tx) (uint64, error) {
	m := tx.Bucket(bucketMeta)
	var last uint64
	if v := m.Get(keyRevocationSeq); v != nil {
		var err error
		if last, err = getU64(v); err != nil {
			return 0, fmt.Errorf("revocation sequence: %w", err)
		}
	}
	if last == ^uint64(0) {
		return 0, errors.New("revocation sequence exhausted")
	}
	return last + 1, m.Put(keyRevocationSeq, u64(last+1))
}

// LastRevocationSeq is the sequence number of the newest revocation record; 0 when there is none.
func (s *Store) LastRevocationSeq() (uint64, error) {
	var seq uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(keyRevocationSeq)
		if v == nil {
			return nil
		}
		var err error
		seq, err = getU64(v)
		return err
	})
	return seq, err
}

// RevocationRecords returns, in sequence order, at most limit records with a sequence number above
// after.
func (s *Store) RevocationRecords(after uint64, limit int) ([]SignedRecord, error) {
	var out []SignedRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketRevRecords).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil && len(out) < limit; k, v = c.Next() {
			seq, err := getU64(k)
			if err != nil {
				return fmt.Errorf("revocation record key: %w; the store is damaged", err)
			}
			if seq <= after {
				continue // after+1 overflowed to 0
			}
			out = append(out, SignedRecord{Seq: seq, Raw: bytes.Clone(v)})
		}
		return nil
	})
	return out, err
}

// PolicyRelease returns the current policy release: its version and signed bytes (0 and nil
// before the first).
func (s *Store) PolicyRelease() (uint64, []byte, error) {
	var (
		version uint64
		raw     []byte
	)
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		version, raw, err = policyRelease(tx)
		return err
	})
	return version, raw, err
}

func policyRelease(tx *bolt.Tx) (uint64, []byte, error) {
	m := tx.Bucket(bucketMeta)
	v := m.Get(keyPolicyVersion)
	if v == nil {
		return 0, nil, nil
	}
	version, err := getU64(v)
	if err != nil {
		return 0, nil, fmt.Errorf("policy version: %w; the store is damaged", err)
	}
	return version, bytes.Clone(m.Get(keyPolicyRelease)), nil
}

// ReleasePolicy makes policy the current policy under the next version (the current one plus
// one), in one durable transaction: sign receives the version and returns the signed release,
// stored with the policy bytes. When onlyFirst is set it does nothing if a release exists (used
// to give a store from before releases its first one).
func (s *Store) ReleasePolicy(policy []byte, onlyFirst bool, sign func(version uint64) ([]byte, error)) (uint64, []byte, error) {
	var (
		version uint64
		raw     []byte
	)
	err := s.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m.Get(keyTrustDomain) == nil {
			return ErrNotInitialized
		}
		cur, curRaw, err := policyRelease(tx)
		if err != nil {
			return err
		}
		if onlyFirst && cur != 0 {
			version, raw = cur, curRaw
			return nil
		}
		if cur == ^uint64(0) {
			return errors.New("policy version exhausted")
		}
		version = cur + 1
		if raw, err = sign(version); err != nil {
			return err
		}
		if err := m.Put(keyPolicy, policy); err != nil {
			return err
		}
		if err := m.Put(keyPolicyRelease, raw); err != nil {
			return err
		}
		return m.Put(keyPolicyVersion, u64(version))
	})
	if err != nil {
		return 0, nil, err
	}
	return version, raw, nil
}

// PolicyApplied is the outcome of ApplyPolicy.
type PolicyApplied struct {
	// Version is the new policy version; nodes refuse any release not above the one they hold.
	Version uint64 `json:"version"`
	// Zones are the new policy's zone names, in file order.
	Zones []string `json:"zones"`
	// Bytes is the policy's size.
	Bytes int `json:"bytes"`
}

// policySigner signs the release of policy as version.
func (a *Authority) policySigner(policy []byte, now time.Time) func(uint64) ([]byte, error) {
	return func(version uint64) ([]byte, error) {
		raw, err := record.SignPolicy(record.PolicyClaims{TrustDomain: a.trustDomain, PolicyVersion: version, IssuedAt: now, Policy: policy}, a.key)
		if err != nil {
			return nil, fmt.Errorf("sign policy release %d: %w", version, err)
		}
		return raw, nil
	}
}

// ApplyPolicy validates policy (name is the file it came from, used in errors: "FILE:LINE: ..."),
// signs it as the next policy version, stores it durably and makes it the policy the authority
// hands out at join and renewal and pushes to watchers. A policy that does not validate is refused
// with ErrPolicyInvalid and changes nothing.
func (a *Authority) ApplyPolicy(_ context.Context, name string, policy []byte) (PolicyApplied, error) {
	p, err := zones.Parse(name, policy)
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrPolicyInvalid, err)
		a.audit(AuditRecord{Event: "policy", Outcome: OutcomeRefused, Reason: err.Error()})
		return PolicyApplied{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	version, raw, err := a.store.ReleasePolicy(policy, false, a.policySigner(policy, a.opts.Now()))
	if err != nil {
		a.audit(AuditRecord{Event: "policy", Outcome: OutcomeRefused, Reason: err.Error()})
		return PolicyApplied{}, err
	}
	a.policy, a.policyBytes, a.policyRelease = p, bytes.Clone(policy), raw
	a.watch.notify()
	names := make([]string, 0, len(p.Zones))
	for _, z := range p.Zones {
		names = append(names, z.Name)
	}
	a.audit(AuditRecord{Event: "policy", Outcome: OutcomeIssued, Reason: fmt.Sprintf("policy version %d from %s: zones %v, %d bytes", version, name, names, len(policy))})
	a.log.Info("policy applied", "version", version, "source", name, "zones", names, "bytes", len(policy))
	return PolicyApplied{Version: version, Zones: names, Bytes: len(policy)}, nil
}

// ApplyPolicyFile reads and applies the policy in path (see ApplyPolicy).
func (a *Authority) ApplyPolicyFile(ctx context.Context, path string) (PolicyApplied, error) {
	b, err := readPolicyFile(path)
	if err != nil {
		return PolicyApplied{}, err
	}
	return a.ApplyPolicy(ctx, path, b)
}

func readPolicyFile(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicyInvalid, err)
	}
	if st.Size() > zones.MaxPolicySize {
		return nil, fmt.Errorf("%w: %s is %d bytes, at most %d", ErrPolicyInvalid, path, st.Size(), zones.MaxPolicySize)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicyInvalid, err)
	}
	return b, nil
}

// ensurePolicyRelease gives a store from before policy releases (or a fresh one) its first
// release, of the stored policy, so join, renewal and watchers always have a signed policy.
func (a *Authority) ensurePolicyRelease() error {
	_, raw, err := a.store.ReleasePolicy(a.policyBytes, true, a.policySigner(a.policyBytes, a.opts.Now()))
	if err != nil {
		return fmt.Errorf("policy release: %w", err)
	}
	a.policyRelease = raw
	return nil
}

// currentPolicy returns the policy, its bytes and its signed release, consistently.
func (a *Authority) currentPolicy() (*zones.Policy, []byte, []byte) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.policy, a.policyBytes, a.policyRelease
}
