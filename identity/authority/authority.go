package authority

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/ute-project/ute/identity"
	"github.com/ute-project/ute/zones"
)

// Files inside an authority directory.
const (
	FileKey   = "authority.key"
	FileCert  = "authority.crt"
	FileStore = "authority.db"
)

// Lifetimes and limits.
const (
	// DefaultNodeLifetime is the node certificate lifetime when no zone caps it lower.
	DefaultNodeLifetime = 24 * time.Hour
	// AuthorityLifetime is the root certificate's lifetime.
	AuthorityLifetime = 10 * 365 * 24 * time.Hour
	// DefaultTokenTTL and MaxTokenTTL bound how long a join token may wait to be used.
	DefaultTokenTTL = 15 * time.Minute
	MaxTokenTTL     = 7 * 24 * time.Hour
	// backdate tolerates clock skew between the authority and a node that just got its certificate.
	backdate = time.Minute
)

// Options configure an Authority.
type Options struct {
	// Now is the clock (tests inject one); nil means time.Now.
	Now func() time.Time
	// Logger receives structured logs; nil means discard.
	Logger *slog.Logger
	// StoreTimeout bounds the wait for the store's file lock; 0 means a short default.
	StoreTimeout time.Duration
	// NodeLifetime overrides DefaultNodeLifetime (zones may still cap it lower).
	NodeLifetime time.Duration
	// Limits bound the audit records and the work unauthenticated peers can cause; zero fields
	// take the defaults.
	Limits Limits
}

func (o Options) withDefaults() Options {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.StoreTimeout == 0 {
		o.StoreTimeout = storeWaitTime
	}
	if o.NodeLifetime == 0 {
		o.NodeLifetime = DefaultNodeLifetime
	}
	o.Limits = o.Limits.withDefaults()
	return o
}

// Authority is an opened authority directory: root key, root certificate, store and policy.
type Authority struct {
	dir         string
	key         ed25519.PrivateKey
	cert        *identity.Certificate
	certDER     []byte
	store       *Store
	trustDomain string
	opts        Options
	log         *slog.Logger
	noise       *noiseLimiter
	// watch fans committed revocation records and policy releases out to watch connections.
	watch *watchHub

	// mu guards the policy, which `ute policy apply` replaces while joins and renewals read it.
	mu            sync.RWMutex
	policy        *zones.Policy
	policyBytes   []byte
	policyRelease []byte
}

// Init creates a new authority in dir: the directory (0700), the root key (0600), the self-signed
// root certificate and the store holding the trust domain, the policy (validated) and the serial
// counter. It refuses a directory that already holds an authority.
func Init(dir, trustDomain, policyPath string, opts Options) error {
	opts = opts.withDefaults()
	if err := identity.ValidateTrustDomain(trustDomain); err != nil {
		return err
	}
	if _, err := zones.Load(policyPath); err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	policy, err := os.ReadFile(policyPath)
	if err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	for _, f := range []string{FileStore, FileKey, FileCert} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("%w: %s exists; choose another --dir", ErrAlreadyInitialized, filepath.Join(dir, f))
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create authority directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("create authority directory: %w", err)
	}
	key, err := identity.GenerateKey()
	if err != nil {
		return err
	}
	cert, err := identity.NewAuthority(trustDomain, key, opts.Now().Add(-backdate), AuthorityLifetime)
	if err != nil {
		return err
	}
	if err := identity.WriteKey(filepath.Join(dir, FileKey), key); err != nil {
		return err
	}
	if err := identity.WriteCertificates(filepath.Join(dir, FileCert), cert); err != nil {
		return err
	}
	// The store is written last: its initialized meta bucket is what Open trusts.
	st, err := OpenStore(filepath.Join(dir, FileStore), opts.StoreTimeout)
	if err != nil {
		return err
	}
	defer func() { _ = st.Close() }()
	return st.Init(trustDomain, policy, opts.Now())
}

// Open opens an initialized authority directory. The store's file lock is held until Close.
func Open(dir string, opts Options) (*Authority, error) {
	opts = opts.withDefaults()
	if _, err := os.Stat(filepath.Join(dir, FileStore)); err != nil {
		return nil, fmt.Errorf("%w: %s has no %s; run `ute authority init --dir %s ...` first", ErrNotInitialized, dir, FileStore, dir)
	}
	key, err := identity.ReadKey(filepath.Join(dir, FileKey))
	if err != nil {
		return nil, err
	}
	certs, err := identity.ReadCertificates(filepath.Join(dir, FileCert))
	if err != nil {
		return nil, err
	}
	cert := certs[0]
	if cert.ID.Kind != identity.KindAuthority || !cert.PublicKey().Equal(key.Public()) {
		return nil, fmt.Errorf("%s does not hold the authority certificate of %s", FileCert, FileKey)
	}
	st, err := OpenStore(filepath.Join(dir, FileStore), opts.StoreTimeout)
	if err != nil {
		return nil, err
	}
	a, err := open(dir, key, cert, st, opts)
	if err != nil {
		_ = st.Close()
		return nil, err
	}
	return a, nil
}

func open(dir string, key ed25519.PrivateKey, cert *identity.Certificate, st *Store, opts Options) (*Authority, error) {
	meta, err := st.Meta()
	if err != nil {
		return nil, err
	}
	if meta.TrustDomain != cert.ID.TrustDomain {
		return nil, fmt.Errorf("store trust domain %q does not match the authority certificate's %q", meta.TrustDomain, cert.ID.TrustDomain)
	}
	policy, err := zones.Parse("policy (stored)", meta.Policy)
	if err != nil {
		return nil, fmt.Errorf("stored policy: %w", err)
	}
	a := &Authority{
		dir: dir, key: key, cert: cert, certDER: cert.Raw(), store: st,
		trustDomain: meta.TrustDomain, policy: policy, policyBytes: meta.Policy,
		opts: opts, log: opts.Logger, noise: newNoiseLimiter(opts.Limits, opts.Now()),
		watch: newWatchHub(opts.Limits),
	}
	if err := a.ensurePolicyRelease(); err != nil {
		return nil, err
	}
	return a, nil
}

// Close writes the pending summaries of suppressed refusals and releases the store.
func (a *Authority) Close() error {
	a.FlushSuppressed()
	return a.store.Close()
}

// FlushSuppressed writes every pending summary of suppressed refusals now, interval ended or not
// (shutdown does it, so a restart never loses a count).
func (a *Authority) FlushSuppressed() {
	a.auditMany(a.noise.flush(a.opts.Now(), true))
}

// flushDueSuppressed writes the summaries whose interval has ended.
func (a *Authority) flushDueSuppressed() {
	a.auditMany(a.noise.flush(a.opts.Now(), false))
}

// TrustDomain is the authority's trust domain.
func (a *Authority) TrustDomain() string { return a.trustDomain }

// Certificate is the root certificate.
func (a *Authority) Certificate() *identity.Certificate { return a.cert }

// Pin is the KeyHash of the root key: what tokens pin.
func (a *Authority) Pin() string { return identity.KeyHash(a.cert.PublicKey()) }

// Store exposes the durable state (audit trail, issued certificates, revoked serials).
func (a *Authority) Store() *Store { return a.store }

// Policy returns the policy the authority hands to nodes.
func (a *Authority) Policy() *zones.Policy { return a.pol() }

// PolicyRelease returns the current policy version and its signed release.
func (a *Authority) PolicyRelease() (uint64, []byte, error) { return a.store.PolicyRelease() }

// pol is the current policy. A join or renewal that races a policy apply may see the old policy
// in one check and the new one in the next; each check is against a validated policy either way.
func (a *Authority) pol() *zones.Policy {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.policy
}

// Revoke revokes one certificate serial (RevokeSubject of "serial:N") and its lineage: that
// certificate and every renewal of it can no longer renew, its node's name is closed until
// ReleaseName, and revocation records tell the nodes.
func (a *Authority) Revoke(serial uint64, reason string) error {
	_, err := a.RevokeSubject(context.Background(), Subject{Serial: serial}.String(), reason)
	return err
}

// CreateToken mints a join token for zones (and optionally regions) valid for spec.TTL. The
// returned IssuedToken.Token holds the only copy of the secret.
func (a *Authority) CreateToken(_ context.Context, spec TokenSpec) (IssuedToken, error) {
	if len(spec.Zones) == 0 {
		return IssuedToken{}, fmt.Errorf("%w: a token needs at least one zone (--zone)", ErrZoneUnknown)
	}
	ttl := spec.TTL
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < 0 || ttl > MaxTokenTTL {
		return IssuedToken{}, fmt.Errorf("token ttl %s out of range; use a duration between 1s and %s", ttl, MaxTokenTTL)
	}
	zs := slices.Clone(spec.Zones)
	slices.Sort(zs)
	zs = slices.Compact(zs)
	for _, name := range zs {
		z, ok := a.pol().Zone(name)
		if !ok {
			return IssuedToken{}, fmt.Errorf("%w: %q; the policy has %v", ErrZoneUnknown, name, a.zoneNames())
		}
		for _, r := range spec.Regions {
			if !z.AllowsRegion(r) {
				return IssuedToken{}, fmt.Errorf("%w: region %q is outside zone %s's placement %v", ErrRegionUnknown, r, name, z.Regions)
			}
		}
	}
	tok, err := identity.NewToken(a.Pin())
	if err != nil {
		return IssuedToken{}, err
	}
	now := a.opts.Now()
	hash := identity.SecretHash(tok.Secret)
	rec := TokenRecord{
		ID: tok.ID, SecretHash: hash[:], Zones: zs, Regions: slices.Clone(spec.Regions),
		CreatedAt: now.UTC(), ExpiresAt: now.Add(ttl).UTC(),
	}
	if err := a.store.PutToken(rec); err != nil {
		return IssuedToken{}, err
	}
	a.audit(AuditRecord{Event: "token", TokenID: tok.ID, Outcome: OutcomeCreated, Reason: fmt.Sprintf("zones %v regions %v ttl %s", zs, spec.Regions, ttl)})
	a.log.Info("token created", "token_id", tok.ID, "zones", zs, "regions", spec.Regions, "expires_at", rec.ExpiresAt)
	return IssuedToken{Token: tok.String(), ID: tok.ID, Zones: zs, Regions: rec.Regions, ExpiresAt: rec.ExpiresAt}, nil
}

func (a *Authority) zoneNames() []string {
	pol := a.pol()
	out := make([]string, 0, len(pol.Zones))
	for _, z := range pol.Zones {
		out = append(out, z.Name)
	}
	return out
}

// Audit returns the audit trail.
func (a *Authority) Audit() ([]AuditRecord, error) { return a.store.Audit() }

func (a *Authority) audit(rec AuditRecord) { a.auditMany([]AuditRecord{rec}) }

func (a *Authority) auditMany(recs []AuditRecord) {
	if len(recs) == 0 {
		return
	}
	for i := range recs {
		if recs[i].Time.IsZero() {
			recs[i].Time = a.opts.Now()
		}
	}
	if err := a.store.AppendAudit(recs...); err != nil {
		a.log.Error("audit write failed", "err", err, "event", recs[0].Event, "outcome", recs[0].Outcome, "records", len(recs))
	}
}

// peer is where a request came from: the address as audited and its accounting source.
type peer struct {
	remote string
	src    netip.Prefix
}

// refuse records a refused request that got past authentication (the token's secret matched, or
// the renewing node's certificate verified) and builds the wire response for it. Such refusals
// are always audited one by one: I3 wants every second use of a token on the record.
func (a *Authority) refuse(_ context.Context, event string, p peer, tokenID string, err error) Response {
	code := codeOf(err)
	a.audit(AuditRecord{Event: event, Remote: p.remote, TokenID: tokenID, Outcome: OutcomeRefused, Reason: err.Error(), WireCode: code})
	a.log.Warn(event+" refused", "remote", p.remote, "token_id", tokenID, "code", code, "err", err)
	return refusal(code, err)
}

// refuseNoise handles a refusal of a request nobody has authenticated yet (malformed bytes, an
// unknown token or wrong secret, a bad CSR before the token was checked, an unverifiable renewal
// certificate). Anyone who completes a handshake can send these as fast as they like, so they go
// through the noise limiter: a few per source per interval are audited individually, the rest are
// counted into a summary.
func (a *Authority) refuseNoise(event string, p peer, tokenID string, err error) Response {
	code := codeOf(err)
	individual, due := a.noise.admit(p.src, reasonKey(event, code), a.opts.Now(), false)
	if individual {
		due = append(due, AuditRecord{Event: event, Remote: p.remote, TokenID: tokenID, Outcome: OutcomeRefused, Reason: err.Error(), WireCode: code})
		a.log.Warn(event+" refused", "remote", p.remote, "token_id", tokenID, "code", code, "err", err)
	} else {
		a.log.Debug(event+" refused (audit suppressed)", "remote", p.remote, "code", code, "err", err)
	}
	a.auditMany(due)
	return refusal(code, err)
}

// noteBusy counts a request refused for lack of capacity: never its own record (that would hand
// the flood an fsync per attempt), only a line in its source's summary.
func (a *Authority) noteBusy(p peer, what string) {
	_, due := a.noise.admit(p.src, "busy/"+what, a.opts.Now(), true)
	a.log.Debug("request refused: busy", "remote", p.remote, "limit", what)
	a.auditMany(due)
}

func refusal(code Code, err error) Response {
	msg := err.Error()
	if code == CodeInternal {
		// Internals stay in the log and the audit trail, never on the wire.
		msg = ErrInternal.Error() + "; the authority's log has the details"
	}
	return Response{Code: code, Message: msg}
}

// join serves one join request: the transport-independent core of OpJoin.
// Refusals before the store has matched the token's secret are unauthenticated noise; from the
// match on, every refusal is audited one by one.
func (a *Authority) join(ctx context.Context, req JoinRequest, p peer) Response {
	remote := p.remote
	if len(req.TokenID) != identity.TokenIDLen || len(req.Secret) != tokenSecretBytes {
		return a.refuseNoise("join", p, "", fmt.Errorf("%w: token id or secret has the wrong length", ErrMalformedToken))
	}
	csr, err := parseCSR(req.CSR)
	if err != nil {
		return a.refuseNoise("join", p, req.TokenID, err)
	}
	issuerCSR, err := parseIssuerCSR(req.IssuerCSR, csr)
	if err != nil {
		return a.refuseNoise("join", p, req.TokenID, err)
	}
	region := req.Region
	switch {
	case region == "":
		region = csr.Region
	case csr.Region != "" && csr.Region != region:
		return a.refuseNoise("join", p, req.TokenID, fmt.Errorf("%w: CSR says region %q but the request says %q", ErrCSR, csr.Region, region))
	}
	now := a.opts.Now()
	hash := identity.SecretHash(req.Secret)
	var (
		claims   identity.Claims
		lifetime time.Duration
	)
	// The certificates are signed inside the transaction that consumes the token, so a consumed
	// token always has its certificates stored: a join retried after a lost answer, with the
	// same keys, gets them back (docs/identity.md, "Retrying a join whose answer was lost").
	res, err := a.store.ConsumeAndIssue(ConsumeRequest{
		ID: req.TokenID, SecretHash: hash[:], Consumer: csr.Name, Now: now,
		Check: func(tok TokenRecord) ([]SliceRequest, error) {
			var err error
			claims, lifetime, err = a.nodeClaims(tok, region, csr.Fingerprint)
			if err != nil {
				return nil, err
			}
			return a.sliceRequests(claims.ZoneNames())
		},
		HoldUntil:     func() time.Time { return a.notAfter(now, lifetime) },
		KeyHash:       identity.KeyHash(csr.PublicKey),
		IssuerKeyHash: identity.KeyHash(issuerCSR.PublicKey),
		Advertise:     req.Advertise,
	}, func(serial uint64, sl []SliceRecord) (IssuedRecord, error) {
		granted := claims
		var err error
		if granted.Zones, err = grantSlices(claims.ZoneNames(), sl); err != nil {
			return IssuedRecord{}, err
		}
		rec, err := a.signNode(csr, granted, lifetime, serial, now, IssuedRecord{TokenID: req.TokenID, RemoteAdr: remote})
		if err != nil {
			return IssuedRecord{}, err
		}
		if rec.IssuerCertDER, err = a.signIssuer(rec.CertDER, issuerCSR.PublicKey); err != nil {
			return IssuedRecord{}, err
		}
		rec.IssuerKeyHash = identity.KeyHash(issuerCSR.PublicKey)
		return rec, nil
	})
	if errors.Is(err, ErrTokenUnknown) {
		return a.refuseNoise("join", p, req.TokenID, err)
	}
	if err != nil {
		return a.refuse(ctx, "join", p, req.TokenID, err)
	}
	tok, serial := res.Token, res.Serial
	subject := identity.NodeID(a.trustDomain, csr.Name).String()
	zoneNames := claims.ZoneNames()
	if res.Retry {
		// Check did not run: the zones are the ones the stored certificate grants.
		cert, err := identity.ParseCertificate(res.Issued.CertDER)
		if err != nil {
			return a.refuse(ctx, "join", p, req.TokenID, fmt.Errorf("stored certificate %d: %w", serial, err))
		}
		zoneNames = cert.Claims.ZoneNames()
	}
	resp := a.storedResponse(res.Issued)
	resp.Members = a.members(csr.Name, zoneNames, now)
	if res.Retry {
		a.audit(AuditRecord{Event: "join", Remote: remote, TokenID: tok.ID, Subject: subject, Serial: serial, Outcome: OutcomeResent,
			Reason: fmt.Sprintf("retry of the join with token %s for the same keys: certificate %d sent again", tok.ID, serial)})
		a.log.Info("node join retried; certificate sent again", "remote", remote, "token_id", tok.ID, "node", csr.Name, "serial", serial)
		return resp
	}
	a.audit(AuditRecord{Event: "join", Remote: remote, TokenID: tok.ID, Subject: subject, Serial: serial, Outcome: OutcomeIssued})
	a.log.Info("node joined", "remote", remote, "token_id", tok.ID, "node", csr.Name, "serial", serial, "zones", zoneNames, "regions", claims.Regions)
	return resp
}

// storedResponse answers a join with the certificates stored for it, node and issuing, so that
// a retry gets the same bytes as the first answer.
func (a *Authority) storedResponse(rec IssuedRecord) Response {
	_, policy, release := a.currentPolicy()
	return Response{Code: CodeOK, NodeCert: rec.CertDER, IssuerCert: rec.IssuerCertDER, AuthorityCert: a.certDER, Policy: policy, PolicyRelease: release}
}

// nodeClaims derives a joining node's claims from the token, the requested region and the policy.
func (a *Authority) nodeClaims(tok TokenRecord, region string, fingerprint []byte) (identity.Claims, time.Duration, error) {
	var (
		grants    []identity.ZoneGrant
		zs        []*zones.Zone
		lifetime  = a.opts.NodeLifetime
		placement []string
	)
	for i, name := range tok.Zones {
		z, ok := a.pol().Zone(name)
		if !ok {
			return identity.Claims{}, 0, fmt.Errorf("%w: token zone %q is no longer in the policy; create a token for %v", ErrTokenZone, name, a.zoneNames())
		}
		zs = append(zs, z)
		// The prefixes are replaced by the node's slices once they are allocated.
		grants = append(grants, identity.ZoneGrant{Name: z.Name})
		lifetime = z.CertLifetime(lifetime)
		if i == 0 {
			placement = slices.Clone(z.Regions)
		} else {
			placement = slices.DeleteFunc(placement, func(r string) bool { return !z.AllowsRegion(r) })
		}
	}
	if len(tok.Regions) > 0 {
		placement = slices.DeleteFunc(placement, func(r string) bool { return !slices.Contains(tok.Regions, r) })
	}
	if region == "" {
		if len(placement) != 1 {
			return identity.Claims{}, 0, fmt.Errorf("%w: no region given and the token allows %v; pass --region", ErrTokenRegion, placement)
		}
		region = placement[0]
	}
	if len(tok.Regions) > 0 && !slices.Contains(tok.Regions, region) {
		return identity.Claims{}, 0, fmt.Errorf("%w: region %q is not one the token allows (%v)", ErrTokenRegion, region, tok.Regions)
	}
	for _, z := range zs {
		if !z.AllowsRegion(region) {
			return identity.Claims{}, 0, fmt.Errorf("%w: region %q is outside zone %s's placement %v", ErrTokenRegion, region, z.Name, z.Regions)
		}
	}
	return identity.Claims{Zones: grants, Regions: []string{region}, Fingerprint: slices.Clone(fingerprint)}, lifetime, nil
}

// signIssuer signs the issuing certificate that goes with the node certificate nodeDER: the
// node's zone grants and regions, its name and serial, the same validity. A join stores it with
// the node certificate (so a retried join gets the same bytes); a renewal does not: it says
// nothing the stored node certificate does not, so a retried renewal gets a fresh one for the
// same key.
func (a *Authority) signIssuer(nodeDER []byte, issuerPub ed25519.PublicKey) ([]byte, error) {
	node, err := identity.ParseCertificate(nodeDER)
	if err != nil {
		return nil, fmt.Errorf("sign issuing certificate: stored node certificate: %w", err)
	}
	cert, err := identity.IssueIssuer(a.cert, a.key, node, issuerPub)
	if err != nil {
		return nil, fmt.Errorf("sign issuing certificate for %s: %w", node.ID, err)
	}
	return cert.Raw(), nil
}

// signNode signs a node certificate with an already allocated serial and fills rec with it.
func (a *Authority) signNode(csr csrInfo, claims identity.Claims, lifetime time.Duration, serial uint64, now time.Time, rec IssuedRecord) (IssuedRecord, error) {
	notAfter := a.notAfter(now, lifetime)
	id := identity.NodeID(a.trustDomain, csr.Name)
	cert, err := identity.Issue(a.cert, a.key, identity.IssueRequest{
		ID: id, PublicKey: csr.PublicKey, Claims: claims,
		NotBefore: now.Add(-backdate), NotAfter: notAfter, Serial: new(big.Int).SetUint64(serial),
	})
	if err != nil {
		return IssuedRecord{}, fmt.Errorf("sign node certificate for %s: %w", id, err)
	}
	rec.Serial = serial
	rec.SPIFFEID = id.String()
	rec.IssuedAt = now.UTC()
	rec.NotAfter = notAfter.UTC()
	rec.KeyHash = cert.KeyHash()
	rec.CertDER = cert.Raw()
	return rec, nil
}

func (a *Authority) issuedResponse(rec IssuedRecord, issuerPub ed25519.PublicKey) (Response, error) {
	issuer, err := a.signIssuer(rec.CertDER, issuerPub)
	if err != nil {
		return Response{}, err
	}
	_, policy, release := a.currentPolicy()
	return Response{Code: CodeOK, NodeCert: rec.CertDER, IssuerCert: issuer, AuthorityCert: a.certDER, Policy: policy, PolicyRelease: release}, nil
}

// notAfter is the expiry of a node certificate issued at now: lifetime, capped by the root's.
func (a *Authority) notAfter(now time.Time, lifetime time.Duration) time.Time {
	notAfter := now.Add(lifetime)
	if caNotAfter := a.cert.X509.NotAfter; notAfter.After(caNotAfter) {
		notAfter = caNotAfter
	}
	return notAfter
}

// renew serves one renewal: the presented certificate (already proven by the TLS handshake to
// belong to the peer) must be a valid, unrevoked node certificate of this authority.
// Until the presented certificate verifies as a current node certificate of this authority the
// caller is unauthenticated (any self-signed or expired certificate completes the handshake), so
// those refusals are noise; after that every refusal is audited one by one.
func (a *Authority) renew(ctx context.Context, req RenewRequest, certs []*x509.Certificate, p peer) Response {
	now := a.opts.Now()
	remote := p.remote
	if len(certs) == 0 {
		return a.refuseNoise("renew", p, "", fmt.Errorf("%w: no client certificate presented", ErrRenewalRefused))
	}
	cur, err := identity.ParseCertificate(certs[0].Raw)
	if err != nil {
		return a.refuseNoise("renew", p, "", fmt.Errorf("%w: %w", ErrRenewalRefused, err))
	}
	if err := (identity.Verifier{Authority: a.cert}).VerifyNode(cur, now); err != nil {
		return a.refuseNoise("renew", p, "", fmt.Errorf("%w: %w", ErrRenewalRefused, err))
	}
	oldSerial, ok := serialUint64(cur.Serial())
	if !ok {
		return a.refuse(ctx, "renew", p, "", fmt.Errorf("%w: serial %s was never issued by this authority", ErrRenewalRefused, cur.Serial()))
	}
	if revoked, err := a.store.IsRevoked(oldSerial); err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	} else if revoked {
		return a.refuse(ctx, "renew", p, "", fmt.Errorf("%w: serial %d of %s; the node must rejoin with a new token", ErrRevoked, oldSerial, cur.ID))
	}
	csr, err := parseCSR(req.CSR)
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	if csr.Name != cur.ID.Name {
		return a.refuse(ctx, "renew", p, "", fmt.Errorf("%w: CSR names %q but the presented certificate is %s", ErrCSR, csr.Name, cur.ID))
	}
	issuerCSR, err := parseIssuerCSR(req.IssuerCSR, csr)
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	claims, lifetime, err := a.renewedClaims(cur)
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	want, err := a.sliceRequests(claims.ZoneNames())
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	held := make(map[string][]netip.Prefix, len(cur.Claims.Zones))
	for _, g := range cur.Claims.Zones {
		held[g.Name] = g.Prefixes
	}
	// The certificate is signed inside the renewal's transaction, so the successor the store
	// records always has its certificate stored: a retry after a lost response gets it back.
	res, err := a.store.RenewAndIssue(RenewalRequest{
		Node: cur.ID.Name, Held: held, Want: want, Now: now, Renews: oldSerial,
		HoldUntil: a.notAfter(now, lifetime), KeyHash: identity.KeyHash(csr.PublicKey), Advertise: req.Advertise,
	}, func(serial uint64, sl []SliceRecord) (IssuedRecord, error) {
		granted := claims
		var err error
		if granted.Zones, err = grantSlices(claims.ZoneNames(), sl); err != nil {
			return IssuedRecord{}, err
		}
		return a.signNode(csr, granted, lifetime, serial, now, IssuedRecord{Renewal: oldSerial, RemoteAdr: remote})
	})
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	if res.Retry {
		a.audit(AuditRecord{Event: "renew", Remote: remote, Subject: cur.ID.String(), Serial: res.Serial, Outcome: OutcomeResent,
			Reason: fmt.Sprintf("retry of the renewal of serial %d for the same key: certificate %d sent again", oldSerial, res.Serial)})
		a.log.Info("node renewal retried; certificate sent again", "remote", remote, "node", cur.ID.String(), "old_serial", oldSerial, "serial", res.Serial)
		resp, err := a.issuedResponse(res.Issued, issuerCSR.PublicKey)
		if err != nil {
			return a.refuse(ctx, "renew", p, "", err)
		}
		resp.Members = a.members(cur.ID.Name, claims.ZoneNames(), now)
		return resp
	}
	a.audit(AuditRecord{Event: "renew", Remote: remote, Subject: cur.ID.String(), Serial: res.Serial, Outcome: OutcomeIssued, Reason: fmt.Sprintf("renews serial %d", oldSerial)})
	a.log.Info("node renewed", "remote", remote, "node", cur.ID.String(), "old_serial", oldSerial, "serial", res.Serial)
	resp, err := a.issuedResponse(res.Issued, issuerCSR.PublicKey)
	if err != nil {
		return a.refuse(ctx, "renew", p, "", err)
	}
	resp.Members = a.members(cur.ID.Name, claims.ZoneNames(), now)
	return resp
}

// renewedClaims carries the node's identity, region and host fingerprint over and re-derives its
// zone grants from the current policy: a zone removed from the policy, or whose placement no
// longer includes the node's region, is dropped.
func (a *Authority) renewedClaims(cur *identity.Certificate) (identity.Claims, time.Duration, error) {
	lifetime := a.opts.NodeLifetime
	var grants []identity.ZoneGrant
	for _, g := range cur.Claims.Zones {
		z, ok := a.pol().Zone(g.Name)
		if !ok {
			continue
		}
		inPlacement := true
		for _, r := range cur.Claims.Regions {
			inPlacement = inPlacement && z.AllowsRegion(r)
		}
		if !inPlacement {
			continue
		}
		// The prefixes are the node's slices, filled in by the store's renewal transaction.
		grants = append(grants, identity.ZoneGrant{Name: z.Name})
		lifetime = z.CertLifetime(lifetime)
	}
	if len(grants) == 0 {
		return identity.Claims{}, 0, fmt.Errorf("%w: none of %s's zones %v remains in the policy for its region; rejoin with a new token", ErrRenewalRefused, cur.ID, cur.Claims.ZoneNames())
	}
	return identity.Claims{
		Zones: grants, Regions: slices.Clone(cur.Claims.Regions),
		Fingerprint: slices.Clone(cur.Claims.Fingerprint), WireGuardKey: slices.Clone(cur.Claims.WireGuardKey),
	}, lifetime, nil
}

// sliceRequests names, for each zone in order, one slice per zone CIDR with the zone's slice length.
func (a *Authority) sliceRequests(zoneNames []string) ([]SliceRequest, error) {
	var out []SliceRequest
	for _, name := range zoneNames {
		z, ok := a.pol().Zone(name)
		if !ok {
			return nil, fmt.Errorf("%w: zone %q is not in the policy", ErrTokenZone, name)
		}
		for _, cidr := range z.CIDRs {
			out = append(out, SliceRequest{Zone: z.Name, CIDR: cidr, Bits: z.NodePrefixFor(cidr)})
		}
	}
	return out, nil
}

// grantSlices builds the node's zone grants from its allocated slices, zones in the given order.
func grantSlices(zoneNames []string, recs []SliceRecord) ([]identity.ZoneGrant, error) {
	byZone, err := grantsFrom(zoneNames, recs)
	if err != nil {
		return nil, err
	}
	grants := make([]identity.ZoneGrant, 0, len(zoneNames))
	for _, name := range zoneNames {
		if len(byZone[name]) == 0 {
			return nil, fmt.Errorf("zone %s: no slice was allocated", name)
		}
		grants = append(grants, identity.ZoneGrant{Name: name, Prefixes: byZone[name]})
	}
	return grants, nil
}

func serialUint64(s *big.Int) (uint64, bool) {
	if s == nil || s.Sign() <= 0 || !s.IsUint64() {
		return 0, false
	}
	return s.Uint64(), true
}
