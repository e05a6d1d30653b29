// Command benchrun turns the output of `go test -bench` into UTE's performance results table
// (docs/design.md, performance targets): each result beside its same-run baseline, the ratio, the target and
// whether it is met. `make bench` pipes the whole benchmark run through it:
//
//	go test -run='^$' -bench=. -benchmem ./... 2>&1 | benchrun -out bin/bench.txt
//
// It echoes its input as it arrives (so a long run shows progress), keeps a copy in -out, and
// prints the table at the end; -format=markdown prints the table for docs/benchmarks.md.
//
// Owns: reading benchmark lines and presenting the targets. It must never run or time anything
// itself, never compute a ratio from numbers of different runs, and never hide a failed or missing
// benchmark: either one makes it exit 1. A missed target is reported, and fails the run only with
// -strict.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// exit codes, as the ute CLI uses them.
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("benchrun", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "also write the raw benchmark output to this file")
	format := fs.String("format", "text", "table format: text or markdown")
	quiet := fs.Bool("quiet", false, "do not echo the input; print only the table")
	strict := fs.Bool("strict", false, "exit 1 when a target is missed")
	fs.Usage = func() {
		_, _ = fmt.Fprintln(stderr, "usage: go test -run='^$' -bench=. ./... | benchrun [-out FILE] [-format text|markdown] [-quiet] [-strict] [FILE...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if *format != "text" && *format != "markdown" {
		_, _ = fmt.Fprintf(stderr, "benchrun: unknown -format %q; use text or markdown\n", *format)
		return exitUsage
	}

	var inputs []io.Reader
	for _, name := range fs.Args() {
		f, err := os.Open(name)
		if err != nil {
			_, _ = fmt.Fprintf(stderr, "benchrun: %v; pass a file written by go test -bench, or pipe its output in\n", err)
			return exitFail
		}
		defer func() { _ = f.Close() }()
		inputs = append(inputs, f)
	}
	if len(inputs) == 0 {
		inputs = []io.Reader{stdin}
	}

	var echo []io.Writer
	if !*quiet {
		echo = append(echo, stdout)
	}
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			_, _ = fmt.Fprintf(stderr, "benchrun: %v; choose a writable -out path\n", err)
			return exitFail
		}
		defer func() { _ = f.Close() }()
		bw := bufio.NewWriter(f)
		defer func() { _ = bw.Flush() }()
		echo = append(echo, bw)
	}

	rs, err := Parse(io.MultiReader(inputs...), io.MultiWriter(echo...))
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "benchrun: reading benchmark output: %v\n", err)
		return exitFail
	}
	checks := Evaluate(rs)
	_, _ = fmt.Fprintln(stdout)
	if *format == "markdown" {
		err = WriteMarkdown(stdout, checks)
	} else {
		err = WriteText(stdout, checks)
	}
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "benchrun: %v\n", err)
		return exitFail
	}

	code := exitOK
	if len(rs.Failures) > 0 {
		_, _ = fmt.Fprintf(stderr, "benchrun: %d benchmark failure line(s), first: %s; see the output above\n", len(rs.Failures), rs.Failures[0])
		code = exitFail
	}
	var missing, missed int
	for _, c := range checks {
		switch c.Met {
		case MetMissing:
			missing++
		case MetNo:
			missed++
		}
	}
	if missing > 0 {
		_, _ = fmt.Fprintf(stderr, "benchrun: %d result(s) missing; run every package's benchmarks (-bench=. ./...)\n", missing)
		code = exitFail
	}
	if missed > 0 && *strict {
		_, _ = fmt.Fprintf(stderr, "benchrun: %d target(s) missed\n", missed)
		code = exitFail
	}
	return code
}
