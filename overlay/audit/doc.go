// Package audit owns UTE's tamper-evident audit log: an append-only file of JSON lines in which
// every entry carries the SHA-256 hash of the entry before it, plus a head file (entry count and
// last hash, replaced atomically) that anchors the end of the chain, and Verify, which finds the
// first edited, removed, reordered or truncated entry.
//
// File layout in the log directory: audit.log (0600, one entry per line) and audit.head (0600).
// An entry line is the canonical JSON of {seq, time, event, fields, prev} with ,"hash":"<hex>"
// spliced in before the closing brace, where hash = SHA-256 of that canonical JSON (the line without
// the hash member). Hashing the exact bytes means even a case change in a key is caught.
//
// Durability: Append writes the line to the file at once (one write(2), O_APPEND); fsync of the log
// and the head rewrite are batched FlushInterval (default 100 ms) after the first Append since the
// last sync by a flusher goroutine (idle while nothing is appended) that Close stops, or done on every Append when FlushInterval is negative, or on demand with Sync. The
// head is written only after the log is fsynced, so it never anchors entries that are not durable.
// Consequence, stated plainly: entries appended after the last head update are chained but not yet
// anchored, so a truncation of only those (at most one interval's worth) is not detectable; Verify
// reports how many entries are unanchored.
//
// Threat model: the chain and head detect accidental corruption and tampering by anyone who cannot
// also rewrite the whole file and the head consistently. An attacker with write access who
// recomputes every hash is caught only when the log is opened with a key (Options.Key: every head is
// then Ed25519-signed, and VerifyWithKey requires the signature) or when the head hash was shipped
// off-host (gossip, metrics).
//
// A node opens its log with Options.SetAside: it never signs over what it cannot verify against
// its own last signed head (Key, or TrustedKeys: its keys before renewals). Entries after that
// head are moved to audit.log.aside-<time>; a log whose head does not verify or whose entries do
// not match it is moved aside whole; either way an EventSetAside entry, signed, names the file.
// VerifyWithKeys lists the set-aside parts (Report.Aside) and names the key that verified.
//
// Flood (flood.go) keeps refusals from filling the disk: the first refusal of each kind is
// written at once, identical ones within a window become one EventCollapsed entry with the exact
// count, and a byte budget per hour caps refusal entries, EventBudget entries recording what was
// dropped. Its entries are ordinary entries of the chain. It never collapses or drops an entry
// that its caller did not pass as a refusal.
//
// It must never rewrite or reorder committed entries, never continue a chain it could not verify on
// open (a tampered log refuses to open), and never log secrets: callers pass identities and reasons
// only.
package audit
