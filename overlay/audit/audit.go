package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// File names inside the log directory.
const (
	LogFile  = "audit.log"
	HeadFile = "audit.head"
)

// Common event names. Any lowercase name matching [a-z0-9._-]{1,64} is accepted.
const (
	EventAdmit  = "admit"
	EventDeny   = "deny"
	EventRevoke = "revoke"
)

// Limits on one entry, so a log line stays small and Verify's line buffer bounded.
const (
	MaxFields     = 64
	MaxFieldKey   = 64
	MaxFieldValue = 1024
	maxLine       = 1 << 20
)

// Errors. Verification failures are reported as *VerifyError wrapping one of the sentinels.
var (
	ErrEdited      = errors.New("entry was edited (its hash does not match its content)")
	ErrBrokenChain = errors.New("entry does not chain to the one before (prev hash mismatch)")
	ErrGap         = errors.New("entry missing (sequence gap)")
	ErrReordered   = errors.New("entries reordered (sequence out of order)")
	ErrTruncated   = errors.New("log truncated (fewer entries than the head records)")
	ErrHeadChanged = errors.New("head does not match the log (log rewritten or head edited)")
	ErrHeadMissing = errors.New("head file missing or unreadable")
	ErrTornTail    = errors.New("last entry is incomplete (torn write)")
	ErrNoLog       = errors.New("no audit log in this directory")
	ErrLocked      = errors.New("audit log is in use by another process")
	ErrClosed      = errors.New("audit log is closed")
	ErrBadEntry    = errors.New("invalid audit entry")
	// ErrHeadSignature: the head is unsigned or its signature does not verify with the log's key.
	ErrHeadSignature = errors.New("head signature missing or invalid (head forged or log key changed)")
)

// Entry is what a caller appends.
type Entry struct {
	Event  string
	Fields map[string]string
	Time   time.Time // zero means now
}

// Record is a committed entry as stored.
type Record struct {
	Seq    uint64            `json:"seq"`
	Time   string            `json:"time"`
	Event  string            `json:"event"`
	Fields map[string]string `json:"fields,omitempty"`
	Prev   string            `json:"prev"`
}

var genesis = hex.EncodeToString(make([]byte, sha256.Size))

// encode returns the stored line (with trailing newline) and the entry's hash.
func (r *Record) encode() ([]byte, string, error) {
	var h [2 * sha256.Size]byte
	line := appendLine(nil, r.Seq, r.Time, r.Event, r.Fields, r.Prev, &h)
	return line, string(h[:]), nil
}

const hashSuffixLen = len(`,"hash":"`) + 2*sha256.Size + len(`"}`)

// decodeLine checks one line (without newline) against its own hash and canonical form.
func decodeLine(line []byte) (*Record, string, error) {
	if len(line) < hashSuffixLen+2 || !bytes.HasPrefix(line[len(line)-hashSuffixLen:], []byte(`,"hash":"`)) ||
		!bytes.HasSuffix(line, []byte(`"}`)) {
		return nil, "", fmt.Errorf("%w: line does not end in a hash member", ErrEdited)
	}
	h := string(line[len(line)-hashSuffixLen+len(`,"hash":"`) : len(line)-2])
	body := append(bytes.Clone(line[:len(line)-hashSuffixLen]), '}')
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != h {
		return nil, "", fmt.Errorf("%w", ErrEdited)
	}
	var r Record
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrEdited, err)
	}
	again, err := json.Marshal(&r)
	if err != nil || !bytes.Equal(again, body) {
		return nil, "", fmt.Errorf("%w: not in canonical form", ErrEdited)
	}
	return &r, h, nil
}

type head struct {
	Count uint64 `json:"count"`
	Hash  string `json:"hash"`
	Sig   string `json:"sig,omitempty"` // Ed25519 over headMessage, when the log has a key
	Key   string `json:"key,omitempty"` // hex public key of the signer, so a key change can be told from a forgery
}

// headMessage is what a signed head signs: a domain-separation label, the count and the hash.
func headMessage(count uint64, hash string) []byte {
	m := []byte("ute-audit-head-v1\x00")
	m = binary.BigEndian.AppendUint64(m, count)
	return append(m, hash...)
}

func (h *head) sign(key ed25519.PrivateKey) {
	if key != nil {
		h.Sig = hex.EncodeToString(ed25519.Sign(key, headMessage(h.Count, h.Hash)))
		h.Key = hex.EncodeToString(key.Public().(ed25519.PublicKey))
	}
}

// signedByOther reports whether the head carries a valid signature by a key other than pub, and
// that key: the log's key changed (a node renewed its key) rather than the head being unsigned or
// forged without any key.
func (h *head) signedByOther(pub ed25519.PublicKey) (string, bool) {
	k, err := hex.DecodeString(h.Key)
	if err != nil || len(k) != ed25519.PublicKeySize || bytes.Equal(k, pub) {
		return "", false
	}
	return h.Key, h.verifySig(k) == nil
}

func (h *head) verifySig(pub ed25519.PublicKey) error {
	sig, err := hex.DecodeString(h.Sig)
	if err != nil || h.Sig == "" || !ed25519.Verify(pub, headMessage(h.Count, h.Hash), sig) {
		return ErrHeadSignature
	}
	return nil
}

func readHead(dir string) (*head, error) {
	b, err := os.ReadFile(filepath.Join(dir, HeadFile))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrHeadMissing, err)
	}
	var h head
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil || len(h.Hash) != 2*sha256.Size {
		return nil, fmt.Errorf("%w: %s is not a valid head", ErrHeadMissing, HeadFile)
	}
	return &h, nil
}

// writeHead replaces the head atomically: temp file, fsync, rename, fsync of the directory.
func writeHead(dir string, h head) error {
	b, err := json.Marshal(h)
	if err != nil {
		return fmt.Errorf("audit: encode head: %w", err)
	}
	tmp := filepath.Join(dir, HeadFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("audit: write head: %w", err)
	}
	_, werr := f.Write(append(b, '\n'))
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		return fmt.Errorf("audit: write head: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, HeadFile)); err != nil {
		return fmt.Errorf("audit: replace head: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("audit: sync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("audit: sync directory: %w", err)
	}
	return nil
}

// VerifyError locates the first problem: Index is the 0-based entry (line) index.
type VerifyError struct {
	Index int
	Err   error
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("audit: entry %d (line %d): %v", e.Index+1, e.Index+1, e.Err)
}

func (e *VerifyError) Unwrap() error { return e.Err }

// Report summarises a verification.
type Report struct {
	Dir        string `json:"dir"`
	Entries    int    `json:"entries"`    // complete lines in the log
	Anchored   int    `json:"anchored"`   // entries covered by the head
	Unanchored int    `json:"unanchored"` // entries after the head: chained, not yet anchored
	LastHash   string `json:"last_hash"`
	Signed     bool   `json:"signed"` // the head carries a signature (checked only by VerifyWithKey)
	// Key is the public key (hex) whose signature on the head verified, with VerifyWithKeys.
	Key string `json:"key,omitempty"`
	// Aside lists the parts a node set aside because it could not verify them (SetAside): files
	// in the log directory, kept as they were found, each recorded by an EventSetAside entry.
	Aside    []AsidePart `json:"aside,omitempty"`
	OK       bool        `json:"ok"`
	FirstBad int         `json:"first_bad"` // 0-based index of the first bad entry, -1 when OK
	Problem  string      `json:"problem,omitempty"`
}

type scanned struct {
	rec  *Record
	hash string
	err  error
	size int64 // bytes of the line, newline included
}

// scan reads every line; torn reports a final line without newline (its byte offset in tornAt).
func scan(r io.Reader) (lines []scanned, torn bool, goodLen int64, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, rerr := br.ReadSlice('\n')
		if errors.Is(rerr, bufio.ErrBufferFull) {
			// Gather an over-long line up to the cap; anything longer is certainly not ours.
			buf := bytes.Clone(line)
			for errors.Is(rerr, bufio.ErrBufferFull) && len(buf) <= maxLine {
				line, rerr = br.ReadSlice('\n')
				buf = append(buf, line...)
			}
			line = buf
			if len(buf) > maxLine {
				return lines, false, goodLen, fmt.Errorf("%w: line %d exceeds %d bytes", ErrEdited, len(lines)+1, maxLine)
			}
		}
		if errors.Is(rerr, io.EOF) {
			return lines, len(line) > 0, goodLen, nil
		}
		if rerr != nil {
			return lines, false, goodLen, fmt.Errorf("audit: read log: %w", rerr)
		}
		goodLen += int64(len(line))
		rec, h, derr := decodeLine(line[:len(line)-1])
		lines = append(lines, scanned{rec: rec, hash: h, err: derr, size: int64(len(line))})
	}
}

// check walks the chain; it returns the report and the first problem.
func check(dir string, lines []scanned, torn bool, hd *head, hdErr error) (Report, error) {
	rep := Report{Dir: dir, Entries: len(lines), FirstBad: -1, LastHash: genesis}
	fail := func(i int, err error) (Report, error) {
		ve := &VerifyError{Index: i, Err: err}
		rep.FirstBad, rep.Problem = i, ve.Error()
		return rep, ve
	}
	where := map[uint64]int{}
	for i, l := range lines {
		if l.rec != nil {
			where[l.rec.Seq] = i
		}
	}
	prev := genesis
	for i, l := range lines {
		if l.err != nil {
			return fail(i, l.err)
		}
		want := uint64(i) + 1
		if l.rec.Seq != want {
			if j, ok := where[want]; ok && j > i {
				return fail(i, fmt.Errorf("%w: found seq %d where %d belongs (it is at line %d)", ErrReordered, l.rec.Seq, want, j+1))
			}
			return fail(i, fmt.Errorf("%w: found seq %d, expected %d", ErrGap, l.rec.Seq, want))
		}
		if l.rec.Prev != prev {
			return fail(i, ErrBrokenChain)
		}
		prev = l.hash
	}
	rep.LastHash = prev
	if torn {
		return fail(len(lines), ErrTornTail)
	}
	if hdErr != nil {
		if len(lines) == 0 {
			return rep, &VerifyError{Index: 0, Err: fmt.Errorf("%w: %w", ErrNoLog, hdErr)}
		}
		return fail(len(lines)-1, hdErr)
	}
	if hd.Count > uint64(len(lines)) {
		return fail(len(lines), fmt.Errorf("%w: head records %d entries, log has %d", ErrTruncated, hd.Count, len(lines)))
	}
	anchor := genesis
	if hd.Count > 0 {
		anchor = lines[hd.Count-1].hash
	}
	if anchor != hd.Hash {
		return fail(int(hd.Count)-1, ErrHeadChanged)
	}
	rep.Anchored = int(hd.Count)
	rep.Unanchored = len(lines) - int(hd.Count)
	rep.OK = true
	return rep, nil
}

// Verify checks the log in dir end to end: every entry's own hash and canonical form, sequence
// order, the prev-hash chain, and the head anchoring the tail. The error is a *VerifyError naming
// the first bad entry and matching one of the sentinels with errors.Is.
func Verify(dir string) (Report, error) { return verify(dir, nil) }

// VerifyWithKey is Verify that also requires the head to be signed by pub, the public half of the
// key the log was opened with (Options.Key). It catches an attacker who rewrote the whole log and
// head consistently but does not hold the node key.
func VerifyWithKey(dir string, pub ed25519.PublicKey) (Report, error) {
	return VerifyWithKeys(dir, pub)
}

// VerifyWithKeys is VerifyWithKey accepting a head signed by any of keys: the node's current key
// and the earlier keys that handed over to it at renewal (identity.Predecessors). Report.Key
// names the key that verified.
func VerifyWithKeys(dir string, keys ...ed25519.PublicKey) (Report, error) {
	if len(keys) == 0 {
		return Report{Dir: dir, FirstBad: -1}, errors.New("audit: verify: no key given")
	}
	for _, pub := range keys {
		if len(pub) != ed25519.PublicKeySize {
			return Report{Dir: dir, FirstBad: -1}, fmt.Errorf("audit: verify: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
		}
	}
	return verify(dir, keys)
}

func verify(dir string, keys []ed25519.PublicKey) (Report, error) {
	rep, err := verifyLog(dir, keys)
	aside, aerr := ListAside(dir)
	rep.Aside = aside
	return rep, errors.Join(err, aerr)
}

func verifyLog(dir string, keys []ed25519.PublicKey) (Report, error) {
	f, err := os.Open(filepath.Join(dir, LogFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return Report{Dir: dir, FirstBad: -1}, fmt.Errorf("%w: %s not found; pass the directory that holds it", ErrNoLog, filepath.Join(dir, LogFile))
		}
		return Report{Dir: dir, FirstBad: -1}, fmt.Errorf("audit: open log: %w", err)
	}
	defer f.Close()
	lines, torn, _, err := scan(f)
	if err != nil {
		return Report{Dir: dir, FirstBad: len(lines)}, &VerifyError{Index: len(lines), Err: err}
	}
	hd, hdErr := readHead(dir)
	signer := -1
	if hdErr == nil && keys != nil {
		if signer = hd.signer(keys); signer < 0 {
			hdErr = ErrHeadSignature
		}
	}
	rep, err := check(dir, lines, torn, hd, hdErr)
	rep.Signed = hdErr == nil && hd.Sig != ""
	if signer >= 0 {
		rep.Key = hex.EncodeToString(keys[signer])
	}
	return rep, err
}

// signer returns the index of the key in keys whose signature on the head verifies, or -1.
func (h *head) signer(keys []ed25519.PublicKey) int {
	for i, k := range keys {
		if h.verifySig(k) == nil {
			return i
		}
	}
	return -1
}

// AsidePart is a file holding entries a node set aside (see Options.SetAside).
type AsidePart struct {
	File    string `json:"file"`
	Entries int    `json:"entries"` // lines in the file
}

// asideInfix marks set-aside files: audit.log.aside-<time> (and audit.head.aside-<time>).
const asideInfix = ".aside-"

// ListAside lists the parts set aside in the log directory dir, oldest first (their names carry
// the time they were set aside).
func ListAside(dir string) ([]AsidePart, error) {
	names, err := filepath.Glob(filepath.Join(dir, LogFile+asideInfix+"*"))
	if err != nil {
		return nil, fmt.Errorf("audit: list set-aside parts: %w", err)
	}
	var out []AsidePart
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			return out, fmt.Errorf("audit: read set-aside part: %w", err)
		}
		out = append(out, AsidePart{File: filepath.Base(name), Entries: bytes.Count(b, []byte{'\n'})})
	}
	return out, nil
}

// Options tune a Log.
type Options struct {
	// FlushInterval batches fsync and head updates; 0 means 100 ms, negative means on every Append.
	FlushInterval time.Duration
	Logger        *slog.Logger
	Now           func() time.Time
	// Key, when set (the node key), signs every head and is required to verify the existing one on
	// Open; see VerifyWithKey.
	Key ed25519.PrivateKey
	// RecordKeyChange relaxes Open for a Key that rotates (a node's key changes at renewal): a head
	// that is unsigned or signed by another key is not refused; Open appends an EventHeadUnverified
	// entry naming what it found (the previous key, or that the head was unsigned or forged) and
	// signs the head with Key from then on. The evidence stays in the chain, under the new key.
	RecordKeyChange bool
	// SetAside is how a node opens its log: it never signs over what it cannot verify, and never
	// refuses to start over it either. Entries after the last head signed by Key or TrustedKeys
	// (a forged append, or a crash before the flush) are moved to a file beside the log; a log
	// whose head is missing, unsigned, forged, or does not match the entries (edited, reordered,
	// cut) is moved aside whole with its head, and a new log starts. Either way the file is kept
	// as found, and an EventSetAside entry, signed with the rest, names it. Takes precedence over
	// RecordKeyChange; requires Key.
	SetAside bool
	// TrustedKeys are earlier keys of this log's owner (a node's keys before its renewals, proven
	// by its key handovers) whose signature on the head is accepted by SetAside; continuing
	// under Key is then recorded as EventKeyChanged.
	TrustedKeys []ed25519.PublicKey
}

// EventSetAside is the entry a SetAside open appends for each part it moved aside. Fields: part
// ("tail" or "log"), file, entries, reason, and for a tail first_seq.
const EventSetAside = "audit-set-aside"

// EventKeyChanged is the entry a SetAside open appends when the head was signed by one of
// TrustedKeys rather than Key. Fields: from, to (hex public keys).
const EventKeyChanged = "audit-key-changed"

// EventHeadUnverified is the entry Open appends when RecordKeyChange let it continue a log whose
// head did not verify with the current key. Fields: problem ("key-changed" or "unverified"),
// count and hash (the head as found), from (the previous key, for key-changed) and to (the key now
// signing).
const EventHeadUnverified = "audit-head-unverified"

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	dir      string
	opts     Options
	log      *slog.Logger
	mu       sync.Mutex
	f        *os.File
	seq      uint64
	last     [2 * sha256.Size]byte // hex hash of the last entry
	buf      []byte                // the line being appended, reused under mu
	anchored uint64
	err      error // sticky: after a failed write the chain cannot be trusted to continue
	closed   bool
	stop     chan struct{}
	done     chan struct{}
	dirty    chan struct{} // one pending notice that an entry awaits the flusher
}

// Open opens (or creates) the log in dir, verifies what is there, and continues its chain. A torn
// final line beyond the head (a crash mid-write of an entry that was never anchored) is cut off with
// a warning; any other problem refuses to open, naming the entry.
func Open(dir string, opts Options) (*Log, error) {
	if opts.FlushInterval == 0 {
		opts.FlushInterval = 100 * time.Millisecond
	}
	if opts.Key != nil && len(opts.Key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("audit: open: key is %d bytes, want an Ed25519 private key", len(opts.Key))
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: create %s: %w", dir, err)
	}
	path := filepath.Join(dir, LogFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	l, err := open(dir, f, opts)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	if opts.FlushInterval > 0 {
		l.stop, l.done, l.dirty = make(chan struct{}), make(chan struct{}), make(chan struct{}, 1)
		go l.flusher()
	}
	return l, nil
}

func open(dir string, f *os.File, opts Options) (_ *Log, retErr error) {
	orig := f
	defer func() {
		if retErr != nil && f != orig {
			_ = f.Close() // the new log started after setting the old one aside
		}
	}()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrLocked, dir, err)
	}
	if err := f.Chmod(0o600); err != nil {
		return nil, fmt.Errorf("audit: chmod log: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("audit: read log: %w", err)
	}
	lines, torn, goodLen, err := scan(f)
	if err != nil {
		return nil, fmt.Errorf("audit: refusing to continue %s: %w", dir, err)
	}
	hd, hdErr := readHead(dir)
	var notes []Entry
	if opts.SetAside && opts.Key != nil && (hdErr == nil || len(lines) > 0 || torn) {
		var nf *os.File
		nf, lines, hd, notes, err = triage(dir, f, lines, torn, hd, hdErr, opts)
		if err != nil {
			return nil, err
		}
		if nf != f {
			_ = f.Close() // renamed aside; its lock goes with it
			f = nf
		}
		torn, hdErr = false, nil
	}
	if hdErr != nil && len(lines) == 0 && !torn {
		hd = &head{Hash: genesis}
		hd.sign(opts.Key)
		if err := writeHead(dir, *hd); err != nil {
			return nil, err
		}
		hdErr = nil
	}
	var note map[string]string
	if hdErr == nil && opts.Key != nil && !opts.SetAside {
		pub := opts.Key.Public().(ed25519.PublicKey)
		hdErr = hd.verifySig(pub)
		if hdErr != nil && opts.RecordKeyChange {
			note = map[string]string{"problem": "unverified", "count": fmt.Sprint(hd.Count), "hash": hd.Hash, "to": hex.EncodeToString(pub)}
			if from, ok := hd.signedByOther(pub); ok {
				note["problem"], note["from"] = "key-changed", from
			}
			opts.Logger.Warn("audit: head not signed by the current key; continuing and recording it in the log", "dir", dir, "problem", note["problem"])
			hdErr = nil
		}
	}
	if torn && hdErr == nil && hd.Count <= uint64(len(lines)) {
		opts.Logger.Warn("audit: cutting an incomplete last entry left by a crash", "dir", dir, "offset", goodLen)
		if err := f.Truncate(goodLen); err != nil {
			return nil, fmt.Errorf("audit: cut torn entry: %w", err)
		}
		torn = false
	}
	rep, err := check(dir, lines, torn, hd, hdErr)
	if err != nil {
		return nil, fmt.Errorf("audit: refusing to continue %s (move it aside to start a new log): %w", dir, err)
	}
	l := &Log{dir: dir, opts: opts, log: opts.Logger, f: f, seq: uint64(rep.Entries), anchored: uint64(rep.Anchored)}
	if copy(l.last[:], rep.LastHash) != len(l.last) {
		return nil, fmt.Errorf("audit: refusing to continue %s: last hash %q is not a hex SHA-256", dir, rep.LastHash)
	}
	for _, e := range notes {
		if err := l.Append(context.Background(), e); err != nil {
			return nil, err
		}
	}
	if len(notes) > 0 {
		if err := l.syncLocked(); err != nil {
			return nil, err
		}
	}
	if note != nil {
		// Appended and anchored at once, so the new signed head covers the evidence.
		if err := l.Append(context.Background(), Entry{Event: EventHeadUnverified, Fields: note}); err != nil {
			return nil, err
		}
		if err := l.syncLocked(); err != nil {
			return nil, err
		}
	}
	return l, nil
}

func validate(e *Entry) error {
	if !validName(e.Event, 64) {
		return fmt.Errorf("%w: event %q must match [a-z0-9._-]{1,64}", ErrBadEntry, e.Event)
	}
	if len(e.Fields) > MaxFields {
		return fmt.Errorf("%w: %d fields, limit %d", ErrBadEntry, len(e.Fields), MaxFields)
	}
	for k, v := range e.Fields {
		if !validName(k, MaxFieldKey) {
			return fmt.Errorf("%w: field name %q must match [a-z0-9._-]{1,%d}", ErrBadEntry, k, MaxFieldKey)
		}
		if len(v) > MaxFieldValue {
			return fmt.Errorf("%w: field %s is %d bytes, limit %d", ErrBadEntry, k, len(v), MaxFieldValue)
		}
	}
	return nil
}

func validName(s string, limit int) bool {
	if s == "" || len(s) > limit {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// Append commits one entry to the chain. The line is written before Append returns; it is fsynced
// and anchored by the next flush (or immediately when FlushInterval is negative).
func (l *Log) Append(ctx context.Context, e Entry) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("audit: append: %w", err)
	}
	if err := validate(&e); err != nil {
		return err
	}
	t := e.Time
	if t.IsZero() {
		t = l.opts.Now()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if l.err != nil {
		return fmt.Errorf("audit: log unusable after an earlier failure: %w", l.err)
	}
	// The line is built in a buffer the log reuses (under l.mu) and the time formatted into a
	// stack array, so that the entry of an admitted flow allocates nothing here.
	var ts [40]byte
	seq := l.seq + 1
	var h [2 * sha256.Size]byte
	l.buf = appendLine(l.buf[:0], seq, t.UTC().AppendFormat(ts[:0], time.RFC3339Nano), e.Event, e.Fields, l.last[:], &h)
	_, err := l.f.Write(l.buf)
	if cap(l.buf) > maxKeptBuf {
		l.buf = nil // an outsized entry does not pin its buffer
	}
	if err != nil {
		l.err = err
		return fmt.Errorf("audit: append: %w", err)
	}
	l.seq, l.last = seq, h
	if l.opts.FlushInterval < 0 {
		return l.syncLocked()
	}
	select {
	case l.dirty <- struct{}{}:
	default: // a flush is already due
	}
	return nil
}

// Sync makes every appended entry durable and anchors it in the head.
func (l *Log) Sync() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	return l.syncLocked()
}

func (l *Log) syncLocked() error {
	if l.err != nil {
		return fmt.Errorf("audit: log unusable after an earlier failure: %w", l.err)
	}
	if l.anchored == l.seq {
		return nil
	}
	if err := l.f.Sync(); err != nil {
		l.err = err
		return fmt.Errorf("audit: fsync: %w", err)
	}
	h := head{Count: l.seq, Hash: string(l.last[:])}
	h.sign(l.opts.Key)
	if err := writeHead(l.dir, h); err != nil {
		l.err = err
		return err
	}
	l.anchored = l.seq
	return nil
}

// flusher syncs FlushInterval after the first entry appended since the last sync, so that a burst
// shares one fsync. It sleeps while nothing is appended: a ticker woke an idle node ten times a
// second for nothing (docs/benchmarks.md, "A node at rest").
func (l *Log) flusher() {
	defer close(l.done)
	t := time.NewTimer(l.opts.FlushInterval)
	t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-l.dirty:
		}
		t.Reset(l.opts.FlushInterval)
		select {
		case <-l.stop:
			t.Stop()
			return // Close syncs
		case <-t.C:
		}
		l.mu.Lock()
		err := l.syncLocked()
		l.mu.Unlock()
		if err != nil {
			l.log.Error("audit: flush failed; further appends will fail", "dir", l.dir, "err", err)
			return
		}
	}
}

// Len returns the number of entries in the chain.
func (l *Log) Len() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// Close stops the flusher, makes everything durable and anchored, and releases the file.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	if l.stop != nil {
		close(l.stop)
		<-l.done
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	serr := l.syncLocked()
	cerr := l.f.Close()
	return errors.Join(serr, cerr)
}

// triage is the SetAside part of open: it keeps the verified prefix of the log in place and
// moves anything it cannot verify aside, returning the file to continue (f, or a new one when the
// whole log went aside), the verified lines, the head to continue from and the entries to record.
func triage(dir string, f *os.File, lines []scanned, torn bool, hd *head, hdErr error, opts Options) (*os.File, []scanned, *head, []Entry, error) {
	pub := opts.Key.Public().(ed25519.PublicKey)
	keys := append([]ed25519.PublicKey{pub}, opts.TrustedKeys...)
	var notes []Entry
	reason, signer := "", -1
	if hdErr == nil {
		signer = hd.signer(keys)
	}
	switch {
	case hdErr != nil:
		reason = "head missing or unreadable"
	case signer < 0:
		reason = "head not signed by this node's key (unsigned, forged, or signed by an unknown key)"
	case hd.Count > uint64(len(lines)):
		reason = fmt.Sprintf("log cut: the signed head records %d entries, the log has %d", hd.Count, len(lines))
	default:
		if _, err := check(dir, lines[:hd.Count], false, hd, nil); err != nil {
			reason = err.Error()
			break
		}
		if signer > 0 {
			notes = append(notes, Entry{Event: EventKeyChanged, Fields: map[string]string{
				"from": hex.EncodeToString(keys[signer]), "to": hex.EncodeToString(pub)}})
		}
	}
	stamp := opts.Now().UTC().Format("20060102T150405.000000000Z")
	if reason != "" {
		nf, err := asideWhole(dir, f, stamp)
		if err != nil {
			return nil, nil, nil, nil, err
		}
		name := LogFile + asideInfix + stamp
		opts.Logger.Warn("audit: log could not be verified; set aside whole, starting a new log", "dir", dir, "file", name, "reason", reason)
		notes = append(notes, Entry{Event: EventSetAside, Fields: map[string]string{
			"part": "log", "file": name, "entries": fmt.Sprint(len(lines)), "reason": reason}})
		h := &head{Hash: genesis}
		h.sign(opts.Key)
		if err := writeHead(dir, *h); err != nil {
			return nil, nil, nil, nil, err
		}
		return nf, nil, h, notes, nil
	}
	if uint64(len(lines)) > hd.Count || torn {
		var keep int64
		for _, l := range lines[:hd.Count] {
			keep += l.size
		}
		name := LogFile + asideInfix + stamp
		if err := asideTail(dir, f, keep, name); err != nil {
			return nil, nil, nil, nil, err
		}
		n := len(lines) - int(hd.Count)
		if torn {
			n++
		}
		opts.Logger.Warn("audit: entries after the last signed head set aside", "dir", dir, "file", name, "entries", n)
		notes = append(notes, Entry{Event: EventSetAside, Fields: map[string]string{
			"part": "tail", "file": name, "entries": fmt.Sprint(n), "first_seq": fmt.Sprint(hd.Count + 1),
			"reason": "entries after the last head signed by this node's key (appended by another writer, or not yet anchored at a crash)"}})
		lines = lines[:hd.Count]
	}
	return f, lines, hd, notes, nil
}

// asideWhole renames the log and its head aside and opens a new, locked, empty log.
func asideWhole(dir string, f *os.File, stamp string) (*os.File, error) {
	logPath := filepath.Join(dir, LogFile)
	if err := os.Rename(logPath, logPath+asideInfix+stamp); err != nil {
		return nil, fmt.Errorf("audit: set the log aside: %w", err)
	}
	headPath := filepath.Join(dir, HeadFile)
	if err := os.Rename(headPath, headPath+asideInfix+stamp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("audit: set the head aside: %w", err)
	}
	nf, err := os.OpenFile(logPath, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: start a new log: %w", err)
	}
	if err := syscall.Flock(int(nf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = nf.Close()
		return nil, fmt.Errorf("%w: %s: %v", ErrLocked, dir, err)
	}
	return nf, nil
}

// asideTail copies the log from byte keep on into name (0600, synced) and cuts it off the log.
func asideTail(dir string, f *os.File, keep int64, name string) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("audit: set the tail aside: %w", err)
	}
	af, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("audit: set the tail aside: %w", err)
	}
	_, werr := io.Copy(af, io.NewSectionReader(f, keep, st.Size()-keep))
	serr := af.Sync()
	cerr := af.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		return fmt.Errorf("audit: set the tail aside: %w", err)
	}
	if err := f.Truncate(keep); err != nil {
		return fmt.Errorf("audit: cut the set-aside tail: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("audit: cut the set-aside tail: %w", err)
	}
	return nil
}
