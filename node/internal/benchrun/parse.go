package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// maxLine caps the part of a line that is parsed; longer lines (a panic's goroutine dump can hold
// anything) are still echoed whole but never parsed as a result.
const maxLine = 64 << 10

// Key names one benchmark: its package import path and its name without the -GOMAXPROCS suffix.
type Key struct {
	Pkg, Name string
}

// Result is every value reported for one benchmark, by unit; a benchmark run with -count=N has N
// values per unit.
type Result struct {
	Iterations []int64
	Metrics    map[string][]float64
}

// Results is a parsed benchmark run.
type Results struct {
	Bench map[Key]*Result
	// Failures are the lines that report a failed test, benchmark or package, or a panic.
	Failures []string
}

// Metric is the median of the values reported in unit by benchmark name of the package whose
// import path is pkg or ends in "/"+pkg. The median keeps one odd run of -count=N from moving
// the result.
func (r *Results) Metric(pkg, name, unit string) (float64, bool) {
	for k, res := range r.Bench {
		if k.Name != name || (k.Pkg != pkg && !strings.HasSuffix(k.Pkg, "/"+pkg)) {
			continue
		}
		if v := res.Metrics[unit]; len(v) > 0 {
			return median(v), true
		}
	}
	return 0, false
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Parse reads `go test -bench` output from r, copying every line to echo as soon as it is read.
func Parse(r io.Reader, echo io.Writer) (*Results, error) {
	res := &Results{Bench: map[Key]*Result{}}
	br := bufio.NewReader(r)
	pkg := ""
	for {
		line, err := br.ReadString('\n')
		if len(line) > 0 {
			if _, werr := io.WriteString(echo, line); werr != nil {
				return nil, fmt.Errorf("echo: %w", werr)
			}
			if !strings.HasSuffix(line, "\n") {
				if _, werr := io.WriteString(echo, "\n"); werr != nil {
					return nil, fmt.Errorf("echo: %w", werr)
				}
			}
			if len(line) <= maxLine {
				res.add(&pkg, strings.TrimRight(line, "\r\n"))
			}
		}
		if errors.Is(err, io.EOF) {
			return res, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// add takes one line into res; pkg is the package named by the last "pkg:" line.
func (res *Results) add(pkg *string, line string) {
	switch {
	case strings.HasPrefix(line, "pkg: "):
		*pkg = strings.TrimSpace(strings.TrimPrefix(line, "pkg: "))
		return
	case strings.HasPrefix(line, "--- FAIL"), strings.HasPrefix(line, "FAIL"), strings.HasPrefix(line, "panic: "):
		res.Failures = append(res.Failures, line)
		return
	}
	name, iters, metrics, ok := ParseLine(line)
	if !ok {
		return
	}
	k := Key{Pkg: *pkg, Name: name}
	r := res.Bench[k]
	if r == nil {
		r = &Result{Metrics: map[string][]float64{}}
		res.Bench[k] = r
	}
	r.Iterations = append(r.Iterations, iters)
	for u, v := range metrics {
		r.Metrics[u] = append(r.Metrics[u], v)
	}
}

// golang.org/x/perf/benchfmt was tried in place of ParseLine and kept out: it skips the FAIL and
// panic lines the report must see, and its line scanner stops at 64 KiB, so a separate pass over
// every line would remain and the total would not be shorter.

// ParseLine reads one result line, "BenchmarkName-P  N  V1 unit1  V2 unit2 ...". ok is false for
// any other line, including a malformed result line.
func ParseLine(line string) (name string, iters int64, metrics map[string]float64, ok bool) {
	f := strings.Fields(line)
	if len(f) < 4 || len(f)%2 != 0 || !strings.HasPrefix(f[0], "Benchmark") {
		return "", 0, nil, false
	}
	iters, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || iters <= 0 {
		return "", 0, nil, false
	}
	metrics = make(map[string]float64, (len(f)-2)/2)
	for i := 2; i+1 < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			return "", 0, nil, false
		}
		metrics[f[i+1]] = v
	}
	return trimProcs(f[0]), iters, metrics, true
}

// trimProcs removes the "-P" suffix go test appends to a benchmark name when GOMAXPROCS > 1.
func trimProcs(name string) string {
	i := strings.LastIndexByte(name, '-')
	if i < 0 || i == len(name)-1 || strings.IndexByte(name[i:], '/') >= 0 {
		return name
	}
	if _, err := strconv.Atoi(name[i+1:]); err != nil {
		return name
	}
	return name[:i]
}
