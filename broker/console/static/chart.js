// A small line chart drawn as inline SVG: no library, nothing fetched.
const NS = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function nice(max) {
  if (max <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(max));
  return [1, 2, 5, 10].map((m) => m * p).find((v) => v >= max);
}

// points: [{t, <key>: number}], series: [{key, cls}]; the newest point at the right edge, `span` seconds wide.
export function lineChart(svg, points, series, span = 120) {
  const W = 600, H = 140, L = 40, B = 16, T = 6;
  svg.replaceChildren();
  const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const top = nice(Math.max(0, ...points.flatMap((p) => series.map((s) => p[s.key] || 0))));
  const x = (t) => L + ((t - (now - span)) / span) * (W - L);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    svg.append(el("line", { x1: L, x2: W, y1: y(top * f), y2: y(top * f), class: "grid" }));
    svg.append(el("text", { x: L - 4, y: y(top * f) + 3, "text-anchor": "end", class: "axis" },
      String(Math.round(top * f * 10) / 10)));
  }
  svg.append(el("text", { x: L, y: H - 3, class: "axis" }, `-${span}s`));
  svg.append(el("text", { x: W, y: H - 3, "text-anchor": "end", class: "axis" }, "now"));
  for (const s of series) {
    const shown = points.filter((p) => p.t >= now - span);
    if (shown.length < 2) continue;
    const d = shown.map((p) => `${x(p.t).toFixed(1)},${y(p[s.key] || 0).toFixed(1)}`).join(" ");
    svg.append(el("polyline", { points: d, class: s.cls }));
  }
}
