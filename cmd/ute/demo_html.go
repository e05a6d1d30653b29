package main

import (
	"bytes"
	"fmt"
	"html/template"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The demo's HTML report: the same results as the terminal, as one self-contained page (inline
// style, no script, no network), written next to nothing else so that it survives the demo's
// temporary directory.

// demoRow is one line of the report: a section heading, an allowed flow, a refused attack, a
// failure, or a detail line under the previous row.
type demoRow struct {
	Kind    string // section, ok, refused, fail, detail
	Text    string
	Reason  string
	Elapsed string
	Bytes   string
}

// parseTranscript turns the demo's terminal output into report rows. The output is the source
// of truth: the page says exactly what the terminal said.
func parseTranscript(s string) []demoRow {
	var rows []demoRow
	for _, line := range strings.Split(s, "\n") {
		switch {
		case strings.TrimSpace(line) == "":
		case strings.HasPrefix(line, "  REFUSED  "):
			r := demoRow{Kind: "refused", Text: strings.TrimSpace(strings.TrimPrefix(line, "  REFUSED  "))}
			// The attempt itself may contain an arrow (from → to): the verdict follows the last one.
			if i := strings.LastIndex(r.Text, " → "); i >= 0 {
				what, rest := r.Text[:i], r.Text[i+len(" → "):]
				r.Text = strings.TrimSpace(what)
				if i := strings.LastIndex(rest, "delivered "); i >= 0 {
					r.Bytes = strings.TrimSpace(rest[i+len("delivered "):])
					rest = strings.TrimSpace(rest[:i])
				}
				if f := strings.Fields(rest); len(f) > 0 {
					r.Elapsed = f[len(f)-1]
					r.Reason = strings.TrimSpace(strings.TrimSuffix(rest, r.Elapsed))
				}
			}
			rows = append(rows, r)
		case strings.HasPrefix(line, "  ok       "):
			rows = append(rows, demoRow{Kind: "ok", Text: strings.TrimSpace(strings.TrimPrefix(line, "  ok       "))})
		case strings.HasPrefix(line, "  FAIL     "):
			rows = append(rows, demoRow{Kind: "fail", Text: strings.TrimSpace(strings.TrimPrefix(line, "  FAIL     "))})
		case !strings.HasPrefix(line, " "):
			rows = append(rows, demoRow{Kind: "section", Text: line})
		default:
			rows = append(rows, demoRow{Kind: "detail", Text: strings.TrimSpace(line)})
		}
	}
	return rows
}

var demoPage = template.Must(template.New("demo").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>UTE demo {{.When}}</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;color:#1b1f24;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} .sub{color:#57606a;margin-top:0}
.verdict{padding:.6em 1em;border-radius:6px;font-weight:600;margin:1em 0}
.pass{background:#dafbe1;color:#116329} .failv{background:#ffebe9;color:#82071e}
table{border-collapse:collapse;width:100%;margin:1em 0} td,th{padding:.35em .6em;vertical-align:top;text-align:left}
th{border-bottom:2px solid #d0d7de;font-size:.85em;color:#57606a}
tr.section td{font-weight:600;padding-top:1.2em;border-bottom:1px solid #d0d7de}
tr.detail td{color:#57606a;font-size:.9em;padding-top:0}
.tag{font:600 .75em ui-monospace,monospace;padding:.15em .45em;border-radius:4px}
.ok{background:#dafbe1;color:#116329} .refused{background:#ddf4ff;color:#0969da} .fail{background:#ffebe9;color:#82071e}
.num{font-family:ui-monospace,monospace;white-space:nowrap}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.8em;border-radius:6px}
</style></head><body>
<h1>UTE demo</h1>
<p class="sub">{{.When}} · finished in {{.Elapsed}} · real authority, nodes, QUIC tunnels and gossip on 127.0.0.1</p>
{{if .Failures}}<div class="verdict failv">{{len .Failures}} expectation(s) failed</div>{{else}}<div class="verdict pass">every expectation held: every attack refused, 0 bytes delivered</div>{{end}}
<table><tr><th></th><th>what happened</th><th>what UTE did</th><th>time to block</th><th>bytes to the target</th></tr>
{{range .Rows}}{{if eq .Kind "section"}}<tr class="section"><td colspan="5">{{.Text}}</td></tr>
{{else if eq .Kind "detail"}}<tr class="detail"><td></td><td colspan="4">{{.Text}}</td></tr>
{{else if eq .Kind "refused"}}<tr><td><span class="tag refused">REFUSED</span></td><td>{{.Text}}</td><td>{{.Reason}}</td><td class="num">{{.Elapsed}}</td><td class="num">{{.Bytes}}</td></tr>
{{else if eq .Kind "ok"}}<tr><td><span class="tag ok">OK</span></td><td colspan="4">{{.Text}}</td></tr>
{{else}}<tr><td><span class="tag fail">FAIL</span></td><td colspan="4">{{.Text}}</td></tr>
{{end}}{{end}}</table>
<h2>Terminal output</h2>
<pre>{{.Transcript}}</pre>
</body></html>
`))

// writeDemoHTML writes the report for transcript to path (0644: a report, not a secret).
func writeDemoHTML(path, transcript string, failures []string, elapsed time.Duration, now time.Time) error {
	var buf bytes.Buffer
	err := demoPage.Execute(&buf, struct {
		When, Elapsed, Transcript string
		Failures                  []string
		Rows                      []demoRow
	}{now.UTC().Format(time.RFC3339), elapsed.Round(time.Millisecond).String(), transcript, failures, parseTranscript(transcript)})
	if err != nil {
		return fmt.Errorf("demo report: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("demo report: %w", err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("demo report: %w", err)
	}
	return nil
}

// defaultDemoHTML is where the report goes without --html: outside the demo's temporary
// directory, which is removed at the end.
func defaultDemoHTML() string { return filepath.Join(os.TempDir(), "ute-demo.html") }

// writeReport writes the HTML report of everything printed so far and says where; a report that
// cannot be written is a failed expectation (the demo promises it).
func (d *demo) writeReport(start time.Time) error {
	if d.html == "" {
		return nil
	}
	if err := writeDemoHTML(d.html, d.report.String(), d.failures, time.Since(start), time.Now()); err != nil {
		d.failf("%v", err)
		return fmt.Errorf("demo: %w", err)
	}
	fmt.Fprintf(d.out, "HTML report: %s\n", d.html)
	return nil
}
