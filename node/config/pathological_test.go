package config

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// Hostile files of the maximum size, shaped to make the YAML lexer or parser work hard: each is
// refused (none is a valid config) well within a second or two even under the race detector.
func TestPathologicalInputsAreCheap(t *testing.T) {
	docs := map[string]string{}
	var b strings.Builder
	for i := 0; b.Len() < MaxSize-400; i++ {
		b.WriteString(strings.Repeat(" ", i))
		b.WriteString("-\n")
	}
	docs["blockseq"] = b.String()
	b.Reset()
	for i := 0; b.Len() < MaxSize-400; i++ {
		b.WriteString(strings.Repeat(" ", i))
		b.WriteString("- - - - - - - - - - - - - - - -\n")
	}
	docs["blockseqdash"] = b.String()
	b.Reset()
	for i := 0; b.Len() < MaxSize-400; i++ {
		b.WriteString(strings.Repeat(" ", i))
		b.WriteString("? \n")
	}
	docs["qkeys"] = b.String()
	b.Reset()
	for b.Len() < MaxSize-400 {
		b.WriteString("[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]], ")
	}
	docs["flowwide"] = "peers: [" + b.String() + "]"
	b.Reset()
	for b.Len() < MaxSize-400 {
		b.WriteString("a: 1\n")
	}
	docs["dups"] = b.String()
	b.Reset()
	for i := 0; b.Len() < MaxSize-400; i++ {
		b.WriteString(strings.Repeat(" ", i%300))
		b.WriteString("a:\n")
	}
	docs["sawtooth"] = b.String()
	b.Reset()
	for b.Len() < MaxSize-400 {
		b.WriteString("&a ")
	}
	docs["anchors"] = "x: " + b.String() + "1\n"
	b.Reset()
	b.WriteString("x: \"")
	for b.Len() < MaxSize-400 {
		b.WriteString("\\u0041")
	}
	b.WriteString("\"\n")
	docs["escapes"] = b.String()
	for k, d := range docs {
		st := time.Now()
		_, err := Parse("f", []byte(d))
		assert.Error(t, err, k)
		assert.Less(t, time.Since(st), 5*time.Second, k)
	}
}
