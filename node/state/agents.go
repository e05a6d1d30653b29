package state

import (
	"cmp"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ute-project/ute/identity"
)

// DefaultAgentLifetime is an agent certificate's lifetime unless capped by the node certificate.
const DefaultAgentLifetime = time.Hour

// Files inside agents/<zone>/<name>/.
const (
	fileAgentKey  = "agent.key"
	fileAgentCert = "agent.crt"
	fileAgentMeta = "agent.json"
	backdate      = time.Minute
)

// Agent errors.
var (
	ErrZoneNotHeld   = errors.New("node does not hold the zone")
	ErrAgentExists   = errors.New("agent already exists")
	ErrAgentUnknown  = errors.New("no such agent")
	ErrNodeCertState = errors.New("node certificate cannot issue now")
)

// AgentSpec describes an agent to add.
type AgentSpec struct {
	Name, Zone string
	Exe        string // executable whose digest goes into the workload fingerprint
	UID, GID   uint32
	Labels     map[string]string
	Lifetime   time.Duration // 0 means DefaultAgentLifetime; always capped by the node certificate
}

// Agent is an agent registered on this node.
type Agent struct {
	Name     string            `json:"name"`
	Zone     string            `json:"zone"`
	IP       netip.Addr        `json:"ip"`
	Exe      string            `json:"exe"`
	UID      uint32            `json:"uid"`
	GID      uint32            `json:"gid"`
	Labels   map[string]string `json:"labels,omitempty"`
	Workload string            `json:"workload_digest"`
	Lifetime time.Duration     `json:"lifetime"`

	Cert     *identity.Certificate `json:"-"`
	KeyPath  string                `json:"-"`
	CertPath string                `json:"-"`
}

func (d *Dir) agentDir(zone, name string) string { return filepath.Join(d.path, DirAgents, zone, name) }

// AddAgent registers an agent: it checks the node holds the zone, allocates the lowest free overlay
// IP of the zone (persisted before anything else so an address is never handed out twice), creates
// the agent key (0600) and issues its certificate with the node's issuing key.
//
// Everything a caller can get wrong (names, labels, the executable) is checked before the
// directory changes, and the agent's files are written into a staging directory that is renamed
// into place last, so a refusal or a crash never leaves a half-made agent that would break Agents
// or block the name. A refusal after the IP was persisted gives the IP back.
func (d *Dir) AddAgent(spec AgentSpec) (*Agent, error) {
	if err := identity.ValidateName("agent name", spec.Name); err != nil {
		return nil, err
	}
	if err := identity.ValidateName("zone name", spec.Zone); err != nil {
		return nil, err
	}
	w, err := identity.WorkloadOfExe(spec.Exe, spec.UID, spec.GID)
	if err != nil {
		return nil, err
	}
	digest := w.Digest()
	unlock, err := d.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	node, nodeKey, err := d.issuer()
	if err != nil {
		return nil, err
	}
	grant, ok := node.Claims.Zone(spec.Zone)
	if !ok {
		return nil, fmt.Errorf("%w: node %s does not hold zone %s (it holds %v); join with a token for %s",
			ErrZoneNotHeld, node.ID.Name, spec.Zone, node.Claims.ZoneNames(), spec.Zone)
	}
	dir := d.agentDir(spec.Zone, spec.Name)
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("%w: %s in zone %s; choose another --name", ErrAgentExists, spec.Name, spec.Zone)
	}
	alloc, err := d.readIPAM()
	if err != nil {
		return nil, err
	}
	ip, err := alloc.nextFree(spec.Zone, grant.Prefixes)
	if err != nil {
		return nil, err
	}
	ag := &Agent{
		Name: spec.Name, Zone: spec.Zone, IP: ip, Exe: spec.Exe, UID: spec.UID, GID: spec.GID,
		Labels: maps.Clone(spec.Labels), Workload: hex.EncodeToString(digest[:]), Lifetime: spec.Lifetime,
	}
	// The claims are checked with the IP they will carry before anything is written.
	id := identity.AgentID(node.ID.TrustDomain, ag.Zone, ag.Name)
	if err := agentClaims(ag, digest[:]).ValidateFor(id); err != nil {
		return nil, fmt.Errorf("agent %s/%s: %w", ag.Zone, ag.Name, err)
	}
	alloc.allocate(spec.Zone, spec.Name, ip)
	if err := d.writeIPAM(alloc); err != nil {
		return nil, err
	}
	if err := d.createAgent(node, nodeKey, ag, dir); err != nil {
		alloc.release(spec.Zone, ip)
		if rerr := d.writeIPAM(alloc); rerr != nil {
			return nil, fmt.Errorf("%w (and giving back overlay IP %s failed: %w)", err, ip, rerr)
		}
		return nil, err
	}
	return ag, nil
}

// createAgent writes the agent's key, metadata and certificate into a staging directory beside
// dir and renames it to dir: dir exists only once the agent is complete.
func (d *Dir) createAgent(node *identity.Certificate, nodeKey ed25519.PrivateKey, ag *Agent, dir string) (err error) {
	zoneDir := filepath.Dir(dir)
	if err := os.MkdirAll(zoneDir, 0o700); err != nil {
		return fmt.Errorf("create agent directory: %w", err)
	}
	stage, err := os.MkdirTemp(zoneDir, "."+ag.Name+".tmp-")
	if err != nil {
		return fmt.Errorf("create agent directory: %w", err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(stage)
		}
	}()
	key, err := identity.GenerateKey()
	if err != nil {
		return err
	}
	if err := identity.WriteKey(filepath.Join(stage, fileAgentKey), key); err != nil {
		return err
	}
	meta, err := json.MarshalIndent(ag, "", "  ")
	if err != nil {
		return fmt.Errorf("encode agent.json: %w", err)
	}
	if err := identity.WriteFileAtomic(filepath.Join(stage, fileAgentMeta), append(meta, '\n'), 0o600); err != nil {
		return err
	}
	if err := d.issueAgentIn(node, nodeKey, ag, key, stage); err != nil {
		return err
	}
	if err := identity.RenameSync(stage, dir); err != nil {
		return err
	}
	ag.KeyPath = filepath.Join(dir, fileAgentKey)
	ag.CertPath = filepath.Join(dir, fileAgentCert)
	return nil
}

// issuer loads the node's issuing certificate and key (NodeIssuer) and checks the certificate can
// still sign.
func (d *Dir) issuer() (*identity.Certificate, ed25519.PrivateKey, error) {
	issuer, key, err := d.NodeIssuer()
	if err != nil {
		return nil, nil, err
	}
	if now := d.now(); !now.Before(issuer.X509.NotAfter) {
		return nil, nil, fmt.Errorf("%w: node certificate expired at %s; renew it (`ute node renew --dir %s`) or rejoin",
			ErrNodeCertState, issuer.X509.NotAfter.UTC().Format(time.RFC3339), d.path)
	}
	return issuer, key, nil
}

// agentClaims are the claims of ag's certificate; digest is its workload fingerprint.
func agentClaims(ag *Agent, digest []byte) identity.Claims {
	return identity.Claims{
		Zones:       []identity.ZoneGrant{{Name: ag.Zone}},
		OverlayIPs:  []netip.Addr{ag.IP},
		Fingerprint: digest,
		Labels:      maps.Clone(ag.Labels),
	}
}

// issueAgent signs the agent certificate and writes it into the agent's directory.
func (d *Dir) issueAgent(node *identity.Certificate, nodeKey ed25519.PrivateKey, ag *Agent, key ed25519.PrivateKey) error {
	dir := d.agentDir(ag.Zone, ag.Name)
	if err := d.issueAgentIn(node, nodeKey, ag, key, dir); err != nil {
		return err
	}
	ag.KeyPath = filepath.Join(dir, fileAgentKey)
	ag.CertPath = filepath.Join(dir, fileAgentCert)
	return nil
}

// issueAgentIn signs the agent certificate and writes it into dir.
func (d *Dir) issueAgentIn(node *identity.Certificate, nodeKey ed25519.PrivateKey, ag *Agent, key ed25519.PrivateKey, dir string) error {
	digest, err := hex.DecodeString(ag.Workload)
	if err != nil || len(digest) != 32 {
		return fmt.Errorf("%w: agent %s workload digest", ErrBadFile, ag.Name)
	}
	lifetime := ag.Lifetime
	if lifetime <= 0 {
		lifetime = DefaultAgentLifetime
	}
	now := d.now()
	notBefore := now.Add(-backdate)
	if notBefore.Before(node.X509.NotBefore) {
		notBefore = node.X509.NotBefore
	}
	notAfter := now.Add(lifetime)
	if notAfter.After(node.X509.NotAfter) {
		notAfter = node.X509.NotAfter
	}
	cert, err := identity.Issue(node, nodeKey, identity.IssueRequest{
		ID:        identity.AgentID(node.ID.TrustDomain, ag.Zone, ag.Name),
		PublicKey: key.Public().(ed25519.PublicKey),
		Claims:    agentClaims(ag, digest),
		NotBefore: notBefore,
		NotAfter:  notAfter,
	})
	if err != nil {
		return fmt.Errorf("issue agent certificate for %s/%s: %w", ag.Zone, ag.Name, err)
	}
	ag.Cert = cert
	return identity.WriteFileAtomic(filepath.Join(dir, fileAgentCert), certPEM(cert.Raw()), 0o644)
}

// Agent loads one agent with its certificate.
func (d *Dir) Agent(zone, name string) (*Agent, error) {
	if err := validAgentPath(zone, name); err != nil {
		return nil, err
	}
	dir := d.agentDir(zone, name)
	b, err := readFile(filepath.Join(dir, fileAgentMeta))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s in zone %s; add it with `ute agent add`", ErrAgentUnknown, name, zone)
		}
		return nil, err
	}
	var ag Agent
	if err := json.Unmarshal(b, &ag); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadFile, filepath.Join(dir, fileAgentMeta), err)
	}
	if ag.Zone != zone || ag.Name != name {
		return nil, fmt.Errorf("%w: %s names agent %s/%s", ErrBadFile, dir, ag.Zone, ag.Name)
	}
	ag.KeyPath = filepath.Join(dir, fileAgentKey)
	ag.CertPath = filepath.Join(dir, fileAgentCert)
	if ag.Cert, err = readCert(ag.CertPath); err != nil {
		return nil, err
	}
	return &ag, nil
}

// AgentKey reads an agent's private key (agents never hold their keys; the node does) and
// refuses it (identity.ErrKeyMismatch, naming both files) unless the agent's certificate
// certifies it. Every use of an agent key (the SDK, a reissue after renewal or near expiry) loads
// it here, so an agent.key replaced by another valid key is neither used nor certified again.
func (d *Dir) AgentKey(zone, name string) (ed25519.PrivateKey, error) {
	if err := validAgentPath(zone, name); err != nil {
		return nil, err
	}
	dir := d.agentDir(zone, name)
	_, key, err := loadKeyPair(filepath.Join(dir, fileAgentKey), filepath.Join(dir, fileAgentCert))
	return key, err
}

// Agents lists every agent, sorted by zone then name.
func (d *Dir) Agents() ([]*Agent, error) {
	zoneDirs, err := os.ReadDir(filepath.Join(d.path, DirAgents))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list agents: %w", err)
	}
	var out []*Agent
	for _, z := range zoneDirs {
		if !z.IsDir() {
			continue
		}
		names, err := os.ReadDir(filepath.Join(d.path, DirAgents, z.Name()))
		if err != nil {
			return nil, fmt.Errorf("list agents: %w", err)
		}
		for _, n := range names {
			// A dot name is a staging directory a crash left behind in AddAgent: not an agent.
			if !n.IsDir() || strings.HasPrefix(n.Name(), ".") {
				continue
			}
			ag, err := d.Agent(z.Name(), n.Name())
			if err != nil {
				return nil, err
			}
			out = append(out, ag)
		}
	}
	slices.SortFunc(out, func(a, b *Agent) int {
		if c := cmp.Compare(a.Zone, b.Zone); c != 0 {
			return c
		}
		return cmp.Compare(a.Name, b.Name)
	})
	return out, nil
}

// ReissueAgent issues a fresh certificate for an existing agent (same key, IP, fingerprint and
// labels) from the current issuing certificate: used when the agent's certificate nears expiry and
// after the node itself renewed (its new key must sign its agents again).
func (d *Dir) ReissueAgent(zone, name string) (*Agent, error) {
	unlock, err := d.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	ag, err := d.Agent(zone, name)
	if err != nil {
		return nil, err
	}
	node, nodeKey, err := d.issuer()
	if err != nil {
		return nil, err
	}
	if _, ok := node.Claims.Zone(zone); !ok {
		return nil, fmt.Errorf("%w: node %s no longer holds zone %s; remove agent %s", ErrZoneNotHeld, node.ID.Name, zone, name)
	}
	key, err := d.AgentKey(zone, name)
	if err != nil {
		return nil, err
	}
	if err := d.issueAgent(node, nodeKey, ag, key); err != nil {
		return nil, err
	}
	return ag, nil
}

// validAgentPath refuses a zone or agent name that is not a DNS label before it becomes a path:
// names reach these methods from callers (local API, CLI), and "../x" must not.
func validAgentPath(zone, name string) error {
	if err := identity.ValidateName("zone name", zone); err != nil {
		return err
	}
	return identity.ValidateName("agent name", name)
}

func (d *Dir) readIPAM() (allocations, error) {
	b, err := readFile(d.file(FileIPAM))
	if errors.Is(err, fs.ErrNotExist) {
		return allocations{}, nil
	}
	if err != nil {
		return nil, err
	}
	a := allocations{}
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadFile, FileIPAM, err)
	}
	return a, nil
}

func (d *Dir) writeIPAM(a allocations) error {
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", FileIPAM, err)
	}
	return identity.WriteFileAtomic(d.file(FileIPAM), append(b, '\n'), 0o600)
}
