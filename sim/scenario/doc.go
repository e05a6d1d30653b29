// Package scenario reads simulator scenario files: a topology (zones, node groups, agents), the
// traffic legitimate agents generate, and a timeline of events each with the expectation the run
// checks.
//
// It owns the file format and its validation only. It must never start anything, touch the
// network or the file system beyond reading the one file it is given, and it must refuse rather
// than guess: unknown keys, duplicate keys, anchors, aliases, tags and events this version cannot
// run are errors naming file:line.
package scenario
