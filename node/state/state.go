package state

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/ute-project/ute/identity"
)

// File names inside a node directory. The layout is documented in docs/identity.md.
const (
	FileNodeKey       = "node.key"
	FileNodeCert      = "node.crt"
	FileIssuerCert    = "issuer.crt"
	FileAuthorityCert = "authority.crt"
	FilePolicy        = "policy.yaml"
	FileNodeInfo      = "node.json"
	FileIPAM          = "ipam.json"
	FileKeyHistory    = "key-history.jsonl"
	DirAgents         = "agents"
	fileLock          = ".lock"
	suffixNext        = ".next"
	pemCert           = "CERTIFICATE"
	maxFile           = 1 << 20
)

// Errors of a node directory.
var (
	ErrNotJoined     = errors.New("node directory has not joined a trust domain")
	ErrAlreadyJoined = errors.New("node directory already holds a node identity")
	ErrBadFile       = errors.New("node directory file is damaged")
	// ErrLegacyLayout: the directory was joined before node certificates became SPIFFE leaves
	// with a separate issuing certificate; the node must join again.
	ErrLegacyLayout = errors.New("node directory predates SPIFFE-compatible certificates")
)

// Info is node.json: what the node learned at join besides its certificate.
type Info struct {
	Name        string    `json:"name"`
	Region      string    `json:"region,omitempty"`
	TrustDomain string    `json:"trust_domain"`
	Authority   string    `json:"authority"`
	JoinedAt    time.Time `json:"joined_at"`
}

// Dir is a node's state directory. Methods that change it take an exclusive flock on the
// directory's lock file, so the daemon and an offline `ute agent add` never interleave writes.
type Dir struct {
	path string
	now  func() time.Time
}

// Option configures a Dir.
type Option func(*Dir)

// WithClock injects the clock used for certificate validity (tests).
func WithClock(now func() time.Time) Option { return func(d *Dir) { d.now = now } }

// Create makes path (0700) for a node that is about to join. It refuses a directory that already
// holds a node certificate, so a second join never overwrites an identity.
func Create(path string, opts ...Option) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("create node directory %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o700); err != nil {
		return nil, fmt.Errorf("create node directory %s: %w", path, err)
	}
	d := newDir(path, opts)
	if _, err := os.Stat(d.file(FileNodeCert)); err == nil {
		return nil, fmt.Errorf("%w: %s; use another --dir or remove it to rejoin", ErrAlreadyJoined, path)
	}
	return d, nil
}

// Open opens the directory of a node that has joined. It completes a renewal that was interrupted
// between installing the new key and the new certificate.
func Open(path string, opts ...Option) (*Dir, error) {
	d := newDir(path, opts)
	if _, err := os.Stat(d.file(FileNodeCert)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s has no %s; run `ute node join --dir %s ...` first", ErrNotJoined, path, FileNodeCert, path)
		}
		return nil, fmt.Errorf("open node directory: %w", err)
	}
	unlock, err := d.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.recoverRenewal(); err != nil {
		return nil, err
	}
	// A staged join key left beside node.crt belongs to the join that wrote it (a crash between
	// node.crt and the cleanup in SaveJoin): node.key is the same key.
	if err := d.dropJoinKeys(); err != nil {
		return nil, err
	}
	if err := d.checkLayout(); err != nil {
		return nil, err
	}
	return d, nil
}

// checkLayout refuses, in one line that says what to do, a directory joined before node
// certificates became leaves: it has no issuer.crt, and its node.crt is a CA with a critical
// claims extension that this version refuses to load. Migrating it in place is impossible: only
// the authority can sign the issuing certificate, and it does so at join and renewal only, for
// a node certificate it will accept, which the old one is not.
func (d *Dir) checkLayout() error {
	if _, err := os.Stat(d.file(FileIssuerCert)); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("open node directory: %w", err)
	}
	return fmt.Errorf("%w: %s has %s but no %s; move the directory aside and join again with a new token (ute node join --dir %s ...; docs/identity.md, \"Upgrading a node directory\")",
		ErrLegacyLayout, d.path, FileNodeCert, FileIssuerCert, d.path)
}

func newDir(path string, opts []Option) *Dir {
	d := &Dir{path: path, now: time.Now}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

func (d *Dir) file(name string) string { return filepath.Join(d.path, name) }

// lock takes the directory's exclusive lock; the returned function releases it.
func (d *Dir) lock() (func(), error) {
	f, err := os.OpenFile(d.file(fileLock), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock node directory: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock node directory: %w", err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		_ = f.Close()
	}, nil
}

// Joined is what a successful join hands to the directory.
type Joined struct {
	Key           ed25519.PrivateKey
	NodeCert      []byte // DER
	IssuerCert    []byte // DER of the node's issuing certificate, for identity.IssuerKey(Key)
	AuthorityCert []byte // DER
	Policy        []byte
	Info          Info
}

// SaveJoin writes everything a join produced. The certificate is written last: its presence is
// what marks the directory as joined, so a crash midway leaves a directory that can join again
// (with the same token, which collects the same certificates for the staged key: JoinKey). Once
// node.crt is in place the staged join key is removed.
func (d *Dir) SaveJoin(j Joined) error {
	unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Stat(d.file(FileNodeCert)); err == nil {
		return fmt.Errorf("%w: %s", ErrAlreadyJoined, d.path)
	}
	if len(j.IssuerCert) == 0 {
		return fmt.Errorf("%w: the join produced no issuing certificate", ErrBadFile)
	}
	if err := identity.WriteKey(d.file(FileNodeKey), j.Key); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FileIssuerCert), certPEM(j.IssuerCert), 0o644); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FileAuthorityCert), certPEM(j.AuthorityCert), 0o644); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FilePolicy), j.Policy, 0o644); err != nil {
		return err
	}
	info, err := json.MarshalIndent(j.Info, "", "  ")
	if err != nil {
		return fmt.Errorf("encode node.json: %w", err)
	}
	if err := identity.WriteFileAtomic(d.file(FileNodeInfo), append(info, '\n'), 0o644); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FileNodeCert), certPEM(j.NodeCert), 0o644); err != nil {
		return err
	}
	// The join is complete: node.key holds the staged key now (Open drops a leftover too).
	return d.dropJoinKeys()
}

// Info returns node.json.
func (d *Dir) Info() (Info, error) {
	var info Info
	b, err := readFile(d.file(FileNodeInfo))
	if err != nil {
		return info, err
	}
	if err := json.Unmarshal(b, &info); err != nil {
		return info, fmt.Errorf("%w: %s: %w", ErrBadFile, FileNodeInfo, err)
	}
	return info, nil
}

// NodeKey reads the node's private key and refuses it (identity.ErrKeyMismatch, naming both
// files) unless node.crt certifies it. Every user of the node key (start, renewal, agent issue)
// loads it here, so a node.key replaced by another valid key is never used nor renewed.
func (d *Dir) NodeKey() (ed25519.PrivateKey, error) {
	_, key, err := d.NodeIdentity()
	return key, err
}

// NodeIdentity reads the node certificate and its private key, checked to belong together.
func (d *Dir) NodeIdentity() (*identity.Certificate, ed25519.PrivateKey, error) {
	return loadKeyPair(d.file(FileNodeKey), d.file(FileNodeCert))
}

// loadKeyPair reads a certificate and its private key and refuses the pair unless the
// certificate names that key.
func loadKeyPair(keyPath, certPath string) (*identity.Certificate, ed25519.PrivateKey, error) {
	cert, err := readCert(certPath)
	if err != nil {
		return nil, nil, err
	}
	key, err := identity.ReadKey(keyPath)
	if err != nil {
		return nil, nil, err
	}
	if err := identity.CheckKeyPair(key, keyPath, cert, certPath); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// NodeIssuer reads the node's issuing certificate and derives its key from the node key
// (identity.IssuerKey), refusing the pair unless issuer.crt certifies that key
// (identity.ErrKeyMismatch, naming both files) and belongs to the current node certificate (same
// node, the node certificate's serial).
func (d *Dir) NodeIssuer() (*identity.Certificate, ed25519.PrivateKey, error) {
	node, nodeKey, err := d.NodeIdentity()
	if err != nil {
		return nil, nil, err
	}
	issuer, err := d.IssuerCert()
	if err != nil {
		return nil, nil, err
	}
	key, err := identity.IssuerKey(nodeKey)
	if err != nil {
		return nil, nil, err
	}
	if err := identity.CheckKeyPair(key, d.file(FileNodeKey)+" (issuing key derived from it)", issuer, d.file(FileIssuerCert)); err != nil {
		return nil, nil, err
	}
	if issuer.ID != node.ID || issuer.NodeSerial().Cmp(node.Serial()) != 0 {
		return nil, nil, fmt.Errorf("%w: %s is the issuing certificate of %s serial %s, but %s is %s serial %s; one of the two files was replaced",
			ErrBadFile, d.file(FileIssuerCert), issuer.ID, issuer.NodeSerial(), d.file(FileNodeCert), node.ID, node.Serial())
	}
	return issuer, key, nil
}

// IssuerCert reads and parses the node's issuing certificate.
func (d *Dir) IssuerCert() (*identity.Certificate, error) {
	c, err := readCert(d.file(FileIssuerCert))
	if err != nil {
		return nil, err
	}
	if !c.Issuing {
		return nil, fmt.Errorf("%w: %s is not an issuing certificate", ErrBadFile, d.file(FileIssuerCert))
	}
	return c, nil
}

// NodeCert reads and parses the node certificate.
func (d *Dir) NodeCert() (*identity.Certificate, error) { return readCert(d.file(FileNodeCert)) }

// NodeCertDER returns the node certificate's DER bytes.
func (d *Dir) NodeCertDER() ([]byte, error) { return readCertDER(d.file(FileNodeCert)) }

// AuthorityCert reads and parses the authority certificate received at join.
func (d *Dir) AuthorityCert() (*identity.Certificate, error) {
	return readCert(d.file(FileAuthorityCert))
}

// Policy returns the policy bytes received from the authority.
func (d *Dir) Policy() ([]byte, error) { return readFile(d.file(FilePolicy)) }

// RenewalKey returns the key the next renewal asks a certificate for: the one already staged as
// node.key.next, or a new key staged there (synced to disk) before it is returned. Staging it
// before the request is sent is what makes a renewal retryable: if the response is lost (crash,
// network), the retry sends a CSR for the same key and the authority answers with the certificate
// it already issued, instead of refusing the old certificate as superseded. InstallRenewal
// consumes the staged key. A staged key that does not parse is replaced: it never reached a
// certificate the node could use.
func (d *Dir) RenewalKey() (ed25519.PrivateKey, error) {
	unlock, err := d.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	staged := d.file(FileNodeKey + suffixNext)
	if key, err := identity.ReadKey(staged); err == nil {
		return key, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		_ = os.Remove(staged)
	}
	key, err := identity.GenerateKey()
	if err != nil {
		return nil, err
	}
	if err := identity.WriteKey(staged, key); err != nil {
		return nil, fmt.Errorf("stage the renewal key: %w", err)
	}
	return key, nil
}

// InstallRenewal replaces the node key and certificate with a renewed pair. Each file is renamed
// atomically; the new pair is first staged as *.next files so that Open can finish an installation
// a crash interrupted, and a key never sits next to a certificate it does not match for longer
// than that window.
//
// issuerDER is the issuing certificate that came with the renewal; it is installed with the node
// certificate, so the agents reissued after the renewal are signed by the new issuing key.
func (d *Dir) InstallRenewal(key ed25519.PrivateKey, certDER, issuerDER []byte) error {
	cert, err := identity.ParseCertificate(certDER)
	if err != nil {
		return fmt.Errorf("renewed certificate: %w", err)
	}
	if !bytes.Equal(certPublicKey(cert), key.Public().(ed25519.PublicKey)) {
		return fmt.Errorf("%w: renewed certificate does not match the new key", ErrBadFile)
	}
	issuer, err := identity.ParseCertificate(issuerDER)
	if err != nil {
		return fmt.Errorf("renewed issuing certificate: %w", err)
	}
	ikey, err := identity.IssuerKey(key)
	if err != nil {
		return err
	}
	if !issuer.Issuing || issuer.ID != cert.ID || issuer.NodeSerial().Cmp(cert.Serial()) != 0 || !issuer.PublicKey().Equal(ikey.Public()) {
		return fmt.Errorf("%w: renewed issuing certificate does not belong to the renewed certificate and key", ErrBadFile)
	}
	unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	// The retiring key signs its successor before it is replaced, so that what it signed (the
	// audit log's head) stays verifiable from node.crt after it is gone.
	old, err := d.NodeKey()
	if err != nil {
		return fmt.Errorf("renewal: the current key must sign its successor: %w", err)
	}
	if err := d.appendHandover(identity.SignHandover(old, key.Public().(ed25519.PublicKey))); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FileIssuerCert+suffixNext), certPEM(issuerDER), 0o644); err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(d.file(FileNodeCert+suffixNext), certPEM(certDER), 0o644); err != nil {
		return err
	}
	if err := identity.WriteKey(d.file(FileNodeKey+suffixNext), key); err != nil {
		return err
	}
	return d.finishRenewal()
}

// maxHandovers bounds key-history.jsonl: only the handovers back to the key that signed the
// audit head before the last renewals matter, and a head is re-signed on every flush.
const maxHandovers = 64

func (d *Dir) appendHandover(h identity.Handover) error {
	hist, err := ReadKeyHistory(d.path)
	if err != nil {
		return err
	}
	hist = append(hist, h)
	if len(hist) > maxHandovers {
		hist = hist[len(hist)-maxHandovers:]
	}
	var b []byte
	for _, x := range hist {
		line, err := json.Marshal(x)
		if err != nil {
			return fmt.Errorf("encode %s: %w", FileKeyHistory, err)
		}
		b = append(append(b, line...), '\n')
	}
	return identity.WriteFileAtomic(d.file(FileKeyHistory), b, 0o644)
}

// KeyHistory returns the key handovers recorded at each renewal, oldest first.
func (d *Dir) KeyHistory() ([]identity.Handover, error) { return ReadKeyHistory(d.path) }

// ReadKeyHistory reads key-history.jsonl in the node directory dir; a directory that never renewed
// has none. Lines that do not parse are skipped: a handover proves something only if its
// signature verifies, which the reader checks (identity.Predecessors).
func ReadKeyHistory(dir string) ([]identity.Handover, error) {
	b, err := readFile(filepath.Join(dir, FileKeyHistory))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []identity.Handover
	for line := range bytes.SplitSeq(b, []byte{'\n'}) {
		var h identity.Handover
		if len(line) == 0 || json.Unmarshal(line, &h) != nil {
			continue
		}
		out = append(out, h)
	}
	return out, nil
}

// finishRenewal renames the staged key, then the staged certificates into place.
func (d *Dir) finishRenewal() error {
	if err := identity.RenameSync(d.file(FileNodeKey+suffixNext), d.file(FileNodeKey)); err != nil {
		return err
	}
	return d.installStagedCerts()
}

// installStagedCerts renames the staged issuing certificate (if any) and then the staged node
// certificate into place: node.crt last, like at join.
func (d *Dir) installStagedCerts() error {
	if _, err := os.Stat(d.file(FileIssuerCert + suffixNext)); err == nil {
		if err := identity.RenameSync(d.file(FileIssuerCert+suffixNext), d.file(FileIssuerCert)); err != nil {
			return err
		}
	}
	return identity.RenameSync(d.file(FileNodeCert+suffixNext), d.file(FileNodeCert))
}

// recoverRenewal finishes or rolls back an interrupted InstallRenewal: a staged certificate
// whose staged or installed key matches it is installed; anything else staged with a certificate
// is discarded. A staged key alone is a renewal in flight (RenewalKey) and is kept, so the retry
// asks for the same key.
func (d *Dir) recoverRenewal() error {
	nextCert := d.file(FileNodeCert + suffixNext)
	nextKey := d.file(FileNodeKey + suffixNext)
	nextIssuer := d.file(FileIssuerCert + suffixNext)
	discard := func() error {
		_ = os.Remove(nextCert)
		_ = os.Remove(nextKey)
		_ = os.Remove(nextIssuer)
		return nil
	}
	if _, err := os.Stat(nextCert); errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Stat(nextIssuer); err == nil {
			// An issuing certificate staged without its node certificate never got installed.
			_ = os.Remove(nextIssuer)
		}
		return nil
	}
	cert, err := readCert(nextCert)
	if err != nil {
		return discard()
	}
	if key, err := identity.ReadKey(nextKey); err == nil && bytes.Equal(certPublicKey(cert), key.Public().(ed25519.PublicKey)) {
		return d.finishRenewal()
	}
	if key, err := identity.ReadKey(d.file(FileNodeKey)); err == nil && bytes.Equal(certPublicKey(cert), key.Public().(ed25519.PublicKey)) {
		return d.installStagedCerts()
	}
	return discard()
}

func certPublicKey(c *identity.Certificate) []byte {
	pub, _ := c.X509.PublicKey.(ed25519.PublicKey)
	return pub
}

func certPEM(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: der}) }

func readCertDER(path string) ([]byte, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != pemCert {
		return nil, fmt.Errorf("%w: %s is not a PEM certificate", ErrBadFile, path)
	}
	return block.Bytes, nil
}

func readCert(path string) (*identity.Certificate, error) {
	der, err := readCertDER(path)
	if err != nil {
		return nil, err
	}
	c, err := identity.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if st.Size() > maxFile {
		return nil, fmt.Errorf("%w: %s is %d bytes (limit %d)", ErrBadFile, path, st.Size(), maxFile)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}
