// miscnet live view: stage events arrive as Server-Sent Events (/events); each image is a card whose stages
// appear left to right as the receiver decodes them, the newest one large. Plain JavaScript and SVG, no
// library, nothing fetched from elsewhere.
//
// For tests and measurements every stage tile records, as data- attributes, the receiver's logged_at
// (ms, Unix), when the page got the message (data-received-at) and when its picture was decoded and painted
// (data-shown-at), all on the wall clock: performance.timeOrigin + performance.now().
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const QUERY = TOKEN ? "?token=" + encodeURIComponent(TOKEN) : "";
const STAGE_STATUSES = new Set(["stage", "superseded", "rejected", "decode-error", "decode-timeout"]);
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const METRICS = {
  psnr: {label: "PSNR (dB)", fmt: (v) => v.toFixed(2) + " dB"},
  ms_ssim: {label: "MS-SSIM", fmt: (v) => v.toFixed(4)},
  ssimulacra2: {label: "SSIMULACRA2", fmt: (v) => v.toFixed(1)},
  flip: {label: "FLIP (lower is better)", fmt: (v) => v.toFixed(3)},
};

const images = new Map();  // "stream/order" -> {card, strip, current, currentIndex, name, colour, stages: Map}
const wallNow = () => performance.timeOrigin + performance.now();
let redrawQueued = false;

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function splitKey(key) {
  const cut = key.lastIndexOf("/");
  return [key.slice(0, cut), key.slice(cut + 1)];
}

function setStatus(state, text) {
  const box = document.getElementById("status");
  box.dataset.state = state;
  box.textContent = text;
}

function imageFor(imageKey, ev) {
  let image = images.get(imageKey);
  if (image) return image;
  document.getElementById("empty")?.remove();
  const colour = COLOURS[images.size % COLOURS.length];
  const card = el("article", {"class": "image", "data-image-key": imageKey, "data-image": ev.image});
  const head = el("h2");
  head.append(el("span", {"class": "swatch", "style": "background:" + colour}), ev.image + " ");
  head.append(el("small", {}, ev.stream + (ev.width ? ` · ${ev.width}×${ev.height}` : "")));
  const state = el("span", {"class": "state"}, "arriving");
  head.append(state);
  const current = el("img", {"class": "current", "alt": ev.image + ": newest stage"});
  const strip = el("div", {"class": "strip"});
  card.append(head, current, strip);
  document.getElementById("streams").append(card);
  image = {card, strip, current, state, currentIndex: -1, name: ev.image, colour, stages: new Map()};
  images.set(imageKey, image);
  return image;
}

function caption(ev) {
  const parts = [`${ev.wire_bytes} B on the wire`, `${(ev.time_s * 1000).toFixed(0)} ms`];
  if (ev.status !== "stage") parts.push(ev.status === "superseded" ? "superseded: not decoded" : ev.status);
  return parts.join(" · ");
}

function qualityText(q) {
  if (!q) return "";
  return Object.entries(METRICS).filter(([k]) => q[k] !== null && q[k] !== undefined)
    .map(([k, m]) => `${k === "ms_ssim" ? "MS-SSIM" : k === "psnr" ? "PSNR" : k === "flip" ? "FLIP" : "SSIMULACRA2"} `
      + m.fmt(q[k])).join(" · ");
}

function onStage(ev) {
  const [imageKey, index] = splitKey(ev.key);
  const image = imageFor(imageKey, ev);
  const order = index === "recovered" ? 1e6 : Number(index);
  let tile = image.stages.get(ev.key);
  if (tile) {  // a page that reconnected gets the history again: update, keep the first timings
    tile.data = Object.assign(tile.data, ev, {quality: ev.quality || tile.data.quality});
    tile.node.dataset.status = ev.status;
    tile.cap.textContent = caption(ev);
    return;
  }
  const node = el("figure", {"class": "stage", "data-key": ev.key, "data-index": String(order),
                             "data-stage": ev.stage, "data-label": ev.label, "data-status": ev.status,
                             "data-wire-bytes": String(ev.wire_bytes), "data-time-s": String(ev.time_s),
                             "data-logged-at": ev.logged_at ? String(ev.logged_at * 1000) : "",
                             "data-received-at": String(wallNow())});
  const title = el("b", {}, ev.label);
  const cap = el("span", {}, caption(ev));
  const qual = el("span", {"class": "quality"}, qualityText(ev.quality));
  const figcap = el("figcaption");
  figcap.append(title, el("br"), cap, el("br"), qual);
  tile = {node, cap, qual, data: ev};
  image.stages.set(ev.key, tile);
  // tiles in stage order, whatever order the messages came in
  const after = [...image.strip.children].find((c) => Number(c.dataset.index) > order);
  image.strip.insertBefore(node, after || null);
  if (ev.png !== undefined && ev.png !== null && ev.status === "stage") {
    const img = el("img", {"alt": `${ev.image}: ${ev.label}`});
    node.prepend(img, figcap);
    img.src = `png/${ev.png}.png${QUERY}`;
    img.decode().then(() => {
      if (order >= image.currentIndex) {
        image.currentIndex = order;
        image.current.src = img.src;
        image.current.dataset.key = ev.key;
      }
      // two frames: the first callback runs before the paint that shows the picture, the second after it
      requestAnimationFrame(() => requestAnimationFrame(() => { node.dataset.shownAt = String(wallNow()); }));
    }).catch(() => { node.dataset.status = "preview-error"; });
  } else {
    node.prepend(el("div", {"class": "placeholder"}, ev.status === "stage" ? "no preview" : ev.status), figcap);
    node.dataset.shownAt = String(wallNow());
  }
  if (ev.complete && ev.status === "stage") image.state.textContent = "complete";
  queueRedraw();
}

function onOther(ev) {
  const [imageKey] = splitKey(ev.key);
  const image = images.get(imageKey);
  if (!image) return;
  if (ev.status === "stored") image.state.textContent = "stored";
  if (ev.status === "incomplete" || ev.status === "abandoned") {
    image.state.textContent = ev.status;
    image.card.dataset.end = ev.status;
  }
}

function onQuality(msg) {
  const [imageKey] = splitKey(msg.key);
  const tile = images.get(imageKey)?.stages.get(msg.key);
  if (!tile) return;
  tile.data.quality = msg.quality;
  tile.qual.textContent = qualityText(msg.quality);
  tile.node.dataset.quality = JSON.stringify(msg.quality);
  queueRedraw();
}

function queueRedraw() {
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => { redrawQueued = false; drawCharts(); });
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function ticks(lo, hi, n = 4) {
  const span = hi - lo || 1;
  const step = Math.pow(10, Math.floor(Math.log10(span / n)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= n) || step * 10;
  const digits = Math.max(0, -Math.floor(Math.log10(nice) + 1e-9));  // as many decimals as the step needs
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-9; v += nice) out.push([v, v.toFixed(digits)]);
  return out;
}

function drawChart(svg, xKey, xLabel, metric) {
  const W = 480, H = 260, L = 52, R = 10, T = 12, B = 38;
  svg.replaceChildren();
  const series = [];
  for (const image of images.values()) {
    const pts = [], hollow = [];
    for (const tile of image.stages.values()) {
      const d = tile.data, x = xKey === "time" ? d.time_s : d.wire_bytes;
      const y = d.quality ? d.quality[metric] : null;
      if (d.status === "stage" && y !== null && y !== undefined && isFinite(y)) pts.push([x, y]);
      else if (d.status !== "stage") hollow.push(x);
    }
    pts.sort((a, b) => a[0] - b[0]);
    series.push({image, pts, hollow});
  }
  const xs = series.flatMap((s) => [...s.pts.map((p) => p[0]), ...s.hollow]);
  const ys = series.flatMap((s) => s.pts.map((p) => p[1]));
  const x0 = 0, x1 = Math.max(1e-9, ...xs) * 1.05;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (!ys.length) { y0 = 0; y1 = 1; }
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(svgEl("rect", {x: L, y: T, width: W - L - R, height: H - T - B, "class": "frame"}));
  for (const [t, text] of ticks(x0, x1)) {
    svg.append(svgEl("line", {x1: sx(t), x2: sx(t), y1: T, y2: H - B, "class": "grid"}));
    const label = svgEl("text", {x: sx(t), y: H - B + 14, "text-anchor": "middle"});
    label.textContent = text;
    svg.append(label);
  }
  for (const [t, text] of ticks(y0, y1)) {
    svg.append(svgEl("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), "class": "grid"}));
    const label = svgEl("text", {x: L - 4, y: sy(t) + 4, "text-anchor": "end"});
    label.textContent = text;
    svg.append(label);
  }
  const xl = svgEl("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "class": "axis"});
  xl.textContent = xLabel;
  const yl = svgEl("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle", "class": "axis",
                            transform: `rotate(-90 12 ${(T + H - B) / 2})`});
  yl.textContent = METRICS[metric].label;
  svg.append(xl, yl);
  for (const s of series) {
    if (s.pts.length) {
      svg.append(svgEl("polyline", {points: s.pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "),
                                    stroke: s.image.colour, "class": "series", "data-image": s.image.name}));
      for (const [x, y] of s.pts) svg.append(svgEl("circle", {cx: sx(x), cy: sy(y), r: 3, fill: s.image.colour}));
    }
    for (const x of s.hollow) {
      svg.append(svgEl("circle", {cx: sx(x), cy: H - B, r: 3.5, fill: "none", stroke: s.image.colour,
                                  "class": "superseded"}));
    }
  }
}

function drawCharts() {
  const metric = document.getElementById("metric").value;
  drawChart(document.getElementById("chart-bytes"), "bytes", "bytes received on the wire", metric);
  drawChart(document.getElementById("chart-time"), "time", "seconds since the first packet", metric);
}

function connect() {
  const source = new EventSource("events" + QUERY);
  source.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === "status") {
      const text = {connecting: "connecting to the receiver…",
                    connected: "live: watching the receiver at " + msg.detail,
                    gone: "receiver gone — " + msg.detail,
                    refused: "refused — " + msg.detail}[msg.state] || msg.detail;
      setStatus(msg.state, text);
    } else if (msg.type === "quality") {
      onQuality(msg);
    } else if (msg.type === "event") {
      if (STAGE_STATUSES.has(msg.status) || msg.status === "recovered") onStage(msg);
      else onOther(msg);
    }
  };
  source.onerror = () => {
    if (source.readyState !== EventSource.OPEN) {
      setStatus("viewer-gone", "the viewer is not answering (stopped?); retrying…");
    }
  };
}

document.getElementById("metric").addEventListener("change", drawCharts);
drawCharts();
connect();
