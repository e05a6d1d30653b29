package sim

import (
	"fmt"
	"html"
	"html/template"
	"io"
	"strings"
	"time"
)

// WriteHTML writes the run as one self-contained page: inline CSS and SVG, no script, nothing
// fetched from the network.
func WriteHTML(w io.Writer, res *Result) error {
	var curves []curveView
	for _, e := range res.Events {
		if len(e.Curve) > 0 {
			curves = append(curves, curveView{Name: e.Name, Observed: e.Observed, SVG: template.HTML(curveSVG(e, res)), //nolint:gosec // built from escaped strings
				Model999: PredictTime(max(e.Members, 1), res.Fanout, res.GossipInterval, 0.999), Members: e.Members, Fanout: res.Fanout, Interval: res.GossipInterval,
				HasModel: len(e.Model) > 0})
		}
	}
	v := pageView{Result: res, Topology: template.HTML(topologySVG(res.Topology)), Timeline: template.HTML(timelineSVG(res)), Curves: curves} //nolint:gosec // built from escaped strings
	return pageTmpl.Execute(w, v)
}

type pageView struct {
	*Result
	Topology template.HTML
	Timeline template.HTML
	Curves   []curveView
}

type curveView struct {
	Name, Observed string
	SVG            template.HTML
	Model999       time.Duration
	Members        int
	Fanout         int
	Interval       time.Duration
	HasModel       bool
}

var pageTmpl = template.Must(template.New("page").Funcs(template.FuncMap{"dur": fmtDur}).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>UTE simulation: {{.Scenario}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#1d2330;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #dde;padding-bottom:.2em}
.sub{color:#566}.ok{color:#17723b;font-weight:600}.fail{color:#b3261e;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef;vertical-align:top}
th{background:#f4f6fa}td.num{text-align:right;white-space:nowrap}
.verdict{padding:.6em 1em;border-radius:6px;margin:1em 0;font-weight:600}
.verdict.ok{background:#e6f4ea}.verdict.fail{background:#fce8e6}
svg{max-width:100%;height:auto}.note{font-size:12px;color:#566}
code{background:#f4f6fa;padding:1px 4px;border-radius:3px}
.dil{background:#fff4e0;padding:.6em 1em;border-radius:6px;margin:1em 0}
</style></head><body>
<h1>UTE simulation: {{.Scenario}}</h1>
<div class="sub">{{.Description}}</div>
<p>{{.Nodes}} node(s), {{.Zones}} zone(s), seed {{.Seed}}; gossip <code>{{.Gossip}}</code> (interval {{.GossipInterval}}, fan-out {{.Fanout}});
{{if eq .Underlay "udp-loopback"}}real UDP sockets on loopback (--real; no simulated latency or loss).{{else}}in-memory underlay: latency {{dur .Network.Latency}}, jitter {{dur .Network.Jitter}}, loss {{printf "%.1f" .LossPct}}%.{{end}}
Setup: join {{dur .JoinTime}}, gossip discovery {{dur .GossipTime}}; whole run {{dur .Duration}} (wall-clock).</p>
{{if gt .Dilation 1}}<div class="dil"><b>Time dilation k = {{.Dilation}}.</b> Every timer the simulator reaches (memberlist's gossip, probe and push/pull timings,
link latency and jitter, tunnel idle close, the daemon's reconnect and duplicate confirmation, the timeline and traffic) ran {{.Dilation}}× slower,
and every time on this page except the setup and whole-run times is the measured wall time divided by {{.Dilation}} (simulated time): each node had
{{.Dilation}}× the CPU per simulated second. Not dilated:
<ul class="note">{{range .Undilated}}<li>{{.}}</li>{{end}}</ul></div>{{end}}
{{if .Failed}}<div class="verdict fail">{{.Failed}} of {{len .Events}} expectation(s) failed</div>{{else}}<div class="verdict ok">every expectation held ({{len .Events}} event(s))</div>{{end}}

<h2>Zone topology</h2>
{{.Topology}}

<h2>Event timeline</h2>
{{.Timeline}}
<table><tr><th></th><th>at</th><th>event</th><th>expectation</th><th>observed</th><th>time to block</th><th>leaked</th><th>false denials</th></tr>
{{range .Events}}<tr><td>{{if .Pass}}<span class="ok">ok</span>{{else}}<span class="fail">FAIL</span>{{end}}</td><td class="num">{{dur .At}}</td>
<td><b>{{.Name}}</b><br><span class="note">{{.Kind}}</span></td><td>{{.Expectation}}</td>
<td>{{.Observed}}{{range .Steps}}<br>· {{.What}}: {{.Outcome}}{{if .Reason}} ({{.Reason}}){{end}} in {{dur .Time}}, {{.Leaked}} B{{end}}{{if .Failure}}<br><span class="fail">{{.Failure}}</span>{{end}}</td>
<td class="num">{{if .TimeToBlock}}{{dur .TimeToBlock}}{{else}}—{{end}}</td><td class="num">{{.LeakedBytes}} B</td><td class="num">{{.FalseDenials}}</td></tr>
{{end}}</table>
<p>Legitimate traffic: {{.Traffic.Flows}} flow(s), {{.Traffic.OK}} ok, {{.Traffic.Excused}} excused (an end revoked, down or partitioned away), <b>{{.Traffic.FalseDenials}}</b> false denial(s).
{{range .Traffic.Denials}}<br><span class="note">denied at {{dur .At}}: {{.Flow}}: {{.Error}}</span>{{end}}</p>

{{if .Curves}}<h2>Convergence</h2>
<p class="note">Fraction of the live members that hold what the event waits for (the revocation record(s); for a policy change the
new policy in force; for churn a restarted node's full view), over time since it was issued (measured: solid),
beside the epidemic push model for the same member count and fan-out (dashed): every member holding the record pushes it to
fan-out random members per gossip interval, x' = 1 − (1 − x)(1 − f/(n−1))<sup>n·x</sup>. The model has no packet loss and no
retransmission limit; UTE also re-broadcasts on first receipt and pushes directly over open tunnels.</p>
{{range .Curves}}<h3>{{.Name}}</h3><p>{{.Observed}}.{{if .HasModel}} Model: 99.9% of {{.Members}} member(s) after {{dur .Model999}} (fan-out {{.Fanout}}, interval {{.Interval}}).{{end}}</p>{{.SVG}}{{end}}{{end}}

<h2>Network</h2>
<p>{{.NetworkStats.Sent}} packet(s) sent, {{.NetworkStats.Delivered}} delivered ({{.NetworkStats.Bytes}} B), {{.NetworkStats.Lost}} lost, {{.NetworkStats.Partitioned}} dropped at partitions, {{.NetworkStats.Unreachable}} unreachable.</p>
<h2>What is and is not deterministic</h2>
<p class="note">{{.Nondeterminism}}</p>
<p class="note">Generated by <code>ute sim run</code>{{if .File}} from {{.File}}{{end}}. Everything above ran real node code (identity, zones, DTL signing and admission, QUIC tunnels, memberlist gossip, the revocation store); only the underlay was simulated.</p>
</body></html>
`))

// LossPct is the link loss in percent, for the page.
func (r *Result) LossPct() float64 { return r.Network.Loss * 100 }

var zoneColors = []string{"#3b6fd8", "#d8873b", "#2f9e6e", "#9b4fd1", "#c93f5d", "#4aa3b5", "#8a7a2e"}

func esc(s string) string { return html.EscapeString(s) }

// topologySVG draws each zone as a box holding its nodes; a node in several zones is drawn in
// each, ringed in dark to show it is shared.
func topologySVG(t Topology) string {
	const boxW, pad, dot = 250, 14, 12
	zones := t.Zones
	zoneCount := map[string]int{}
	for _, n := range t.Nodes {
		for range n.Zones {
			zoneCount[n.Name]++
		}
	}
	perRow := (boxW - 2*pad) / dot
	maxRows := 0
	for _, z := range zones {
		maxRows = max(maxRows, (len(z.Nodes)+perRow-1)/perRow)
	}
	labels := len(t.Nodes) <= 24
	boxH := 60 + maxRows*dot
	if labels {
		boxH = 60 + 18*maxLen(zones)
	}
	width := len(zones)*(boxW+20) + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" role="img" aria-label="zone topology">`, width, boxH+30, width)
	for i, z := range zones {
		x := 20 + i*(boxW+20)
		col := zoneColors[i%len(zoneColors)]
		fmt.Fprintf(&b, `<rect x="%d" y="10" width="%d" height="%d" rx="10" fill="%s" fill-opacity="0.08" stroke="%s"/>`, x, boxW, boxH, col, col)
		fmt.Fprintf(&b, `<text x="%d" y="30" font-weight="600" fill="%s">%s</text>`, x+pad, col, esc(z.Name))
		fmt.Fprintf(&b, `<text x="%d" y="46" font-size="11" fill="#566">%s · %s · %d node(s)</text>`, x+pad, esc(z.CIDR), esc(strings.Join(z.Regions, ",")), len(z.Nodes))
		for j, n := range z.Nodes {
			stroke := "none"
			if zoneCount[n] > 1 {
				stroke = "#1d2330"
			}
			if labels {
				y := 64 + j*18
				fmt.Fprintf(&b, `<circle cx="%d" cy="%d" r="5" fill="%s" stroke="%s" stroke-width="2"/>`, x+pad+5, y, col, stroke)
				fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="12">%s%s</text>`, x+pad+16, y+4, esc(n), esc(agentsOf(t, n, z.Name)))
				continue
			}
			cx := x + pad + (j%perRow)*dot + dot/2
			cy := 60 + (j/perRow)*dot + dot/2
			fmt.Fprintf(&b, `<circle cx="%d" cy="%d" r="4" fill="%s" stroke="%s" stroke-width="1.5"><title>%s</title></circle>`, cx, cy, col, stroke, esc(n))
		}
	}
	b.WriteString(`</svg>`)
	return b.String()
}

func maxLen(zs []ZoneInfo) int {
	m := 0
	for _, z := range zs {
		m = max(m, len(z.Nodes))
	}
	return m
}

func agentsOf(t Topology, node, zone string) string {
	for _, n := range t.Nodes {
		if n.Name != node {
			continue
		}
		var as []string
		for _, a := range n.Agents {
			if strings.HasSuffix(a, "."+zone) {
				as = append(as, strings.TrimSuffix(a, "."+zone))
			}
		}
		if len(as) > 0 {
			return "  (" + strings.Join(as, ", ") + ")"
		}
	}
	return ""
}

// timelineSVG places the events on a time axis, green when their expectation held.
func timelineSVG(res *Result) string {
	const w, left, right = 1000, 40, 40
	if len(res.Events) == 0 {
		return ""
	}
	end := res.Events[len(res.Events)-1].At
	for _, e := range res.Events {
		end = max(end, e.At+e.TimeToBlock)
	}
	end = max(end, time.Millisecond) * 11 / 10
	xOf := func(d time.Duration) float64 { return left + float64(d)/float64(end)*(w-left-right) }
	h := 70 + 20*len(res.Events)
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" role="img" aria-label="event timeline">`, w, h, w)
	fmt.Fprintf(&b, `<line x1="%d" y1="30" x2="%d" y2="30" stroke="#889"/>`, left, w-right)
	for _, tk := range ticks(end) {
		x := xOf(tk)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="26" x2="%.1f" y2="34" stroke="#889"/><text x="%.1f" y="20" font-size="11" text-anchor="middle" fill="#566">%s</text>`, x, x, x, esc(fmtDur(tk)))
	}
	for i, e := range res.Events {
		col := "#17723b"
		if !e.Pass {
			col = "#b3261e"
		}
		x := xOf(e.At)
		y := 52 + 20*i
		fmt.Fprintf(&b, `<line x1="%.1f" y1="30" x2="%.1f" y2="%d" stroke="%s" stroke-opacity="0.35"/>`, x, x, y, col)
		if e.TimeToBlock > 0 {
			// The time to block or converge, as a bar under the event's row so that it never
			// covers the label.
			fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="4" fill="%s" fill-opacity="0.45"><title>%s</title></rect>`, x, y+7, max(xOf(e.At+e.TimeToBlock)-x, 1), col, esc(fmtDur(e.TimeToBlock)))
		}
		// Labels of late events go left of their dot so that they stay on the page.
		tx, anchor := x+9, "start"
		if x > w*0.6 {
			tx, anchor = x-9, "end"
		}
		fmt.Fprintf(&b, `<circle cx="%.1f" cy="%d" r="5" fill="%s"/><text x="%.1f" y="%d" font-size="12" text-anchor="%s">%s</text>`, x, y, col, tx, y+4, anchor, esc(e.Name))
	}
	b.WriteString(`</svg>`)
	return b.String()
}

// ticks is a handful of round times up to end.
func ticks(end time.Duration) []time.Duration {
	steps := []time.Duration{time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
		100 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second, 30 * time.Second, time.Minute}
	step := steps[len(steps)-1]
	for _, s := range steps {
		if end/s <= 8 {
			step = s
			break
		}
	}
	var out []time.Duration
	for t := time.Duration(0); t <= end; t += step {
		out = append(out, t)
	}
	return out
}

// curveSVG plots the measured fraction over time (a step line) and the model's (dashed).
func curveSVG(e EventResult, res *Result) string {
	// The legend sits under the time axis, outside the plot, where no curve can run under it.
	const w, h, left, bottom, top, right = 720, 330, 56, 70, 16, 20
	end := e.Curve[len(e.Curve)-1].T
	if len(e.Model) > 0 {
		end = max(end, e.Model[len(e.Model)-1].T)
	}
	end = max(end, time.Millisecond) * 21 / 20
	xOf := func(d time.Duration) float64 { return left + float64(d)/float64(end)*(w-left-right) }
	yOf := func(f float64) float64 { return top + (1-f)*(h-top-bottom) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" role="img" aria-label="convergence curve">`, w, h, w)
	for _, f := range []float64{0, 0.25, 0.5, 0.75, 1} {
		y := yOf(f)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eef"/><text x="%d" y="%.1f" font-size="11" text-anchor="end" fill="#566">%.0f%%</text>`, left, y, w-right, y, left-6, y+4, f*100)
	}
	for _, tk := range ticks(end) {
		x := xOf(tk)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#eef"/><text x="%.1f" y="%d" font-size="11" text-anchor="middle" fill="#566">%s</text>`, x, top, x, h-bottom, x, h-bottom+16, esc(fmtDur(tk)))
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="11" text-anchor="middle" fill="#566">time since the event started</text>`, (w+left)/2, h-bottom+32)
	var pts []string
	prev := 0.0
	curve := e.Curve
	if curve[0].T > 0 {
		// Before the first poll saw anyone holding it, no one is known to: the measured line
		// starts at the origin like the model's, not in mid-air.
		curve = append([]CurvePoint{{T: 0, Fraction: 0}}, curve...)
	}
	for i, p := range curve {
		if i > 0 {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(p.T), yOf(prev)))
		}
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(p.T), yOf(p.Fraction)))
		prev = p.Fraction
	}
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#3b6fd8" stroke-width="2.5" points="%s"/>`, strings.Join(pts, " "))
	pts = pts[:0]
	for _, p := range e.Model {
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(p.T), yOf(p.Fraction)))
	}
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#d8873b" stroke-width="2" stroke-dasharray="6 4" points="%s"/>`, strings.Join(pts, " "))
	lx, ly := left, h-14
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#3b6fd8" stroke-width="2.5"/><text x="%d" y="%d" font-size="12">measured (%d members)</text>`, lx, ly, lx+24, ly, lx+30, ly+4, e.Members)
	lx += 260
	if len(e.Model) == 0 {
		b.WriteString(`</svg>`)
		return b.String()
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#d8873b" stroke-width="2" stroke-dasharray="6 4"/><text x="%d" y="%d" font-size="12">model (fan-out %d, every %s)</text>`, lx, ly, lx+24, ly, lx+30, ly+4, res.Fanout, esc(res.GossipInterval.String()))
	b.WriteString(`</svg>`)
	return b.String()
}
