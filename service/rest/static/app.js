// bnfold's web page: a client of the server's public API, nothing more.
// Models are listed from /metrics (bnfold_model_ready); each model's metadata comes from /v2/models/{m} and
// its labels and preprocessing from /v2/models/{m}/config; "Run" sends a real V2 inference request.
// The API key lives in this page's memory only: never in a URL, never in storage.
"use strict";
(() => {
  const REFRESH_MS = 5000;
  const TOP_K = 5;
  const RAW_LIMIT = 64; // values shown per output in the raw view

  let apiKey = "";
  const cards = new Map(); // model name -> Card
  let digitExamples = null; // promise of service/rest/static/digits.json

  // ------------------------------------------------------------------------------------------ helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    return headers;
  }

  async function failure(res) {
    const text = await res.text();
    let message = text || res.statusText;
    try {
      message = JSON.parse(text).error || message;
    } catch (_) {
      /* not JSON: keep the text */
    }
    return new HttpError(res.status, message);
  }

  async function getJSON(path) {
    const res = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (!res.ok) throw await failure(res);
    return res.json();
  }

  function describe(err) {
    if (err instanceof HttpError) {
      const hint = err.status === 401 ? " — enter the API key at the top of the page" : "";
      return `${err.status}: ${err.message}${hint}`;
    }
    return String((err && err.message) || err);
  }

  function modelPath(name, version) {
    const base = "v2/models/" + encodeURIComponent(name);
    return version ? `${base}/versions/${encodeURIComponent(version)}` : base;
  }

  function formatMs(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const ms = seconds * 1000;
    return ms < 10 ? `${ms.toFixed(2)} ms` : `${ms.toFixed(1)} ms`;
  }

  function shapeText(shape) {
    return "[" + shape.map((d) => (d < 0 ? "?" : d)).join(", ") + "]";
  }

  function notice(text) {
    const box = document.getElementById("notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // ------------------------------------------------------------------------------- metrics (Prometheus)
  function parseMetrics(text) {
    const samples = [];
    const line = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /(\w+)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (!raw || raw[0] === "#") continue;
      const m = line.exec(raw);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      samples.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return samples;
  }

  // {model: {version: {ready, provider, ok, failed, buckets: Map(le -> count)}}}
  function modelStats(samples) {
    const models = {};
    const get = (l) => {
      const versions = (models[l.model] = models[l.model] || {});
      return (versions[l.version] = versions[l.version] || {
        ready: false,
        provider: "",
        ok: 0,
        failed: 0,
        buckets: new Map(),
      });
    };
    for (const s of samples) {
      const l = s.labels;
      if (l.model === undefined || l.version === undefined) continue;
      if (s.name === "bnfold_model_ready") {
        const st = get(l);
        if (s.value > 0) {
          st.ready = true;
          st.provider = l.provider;
        }
      } else if (s.name === "bnfold_inference_success_total") get(l).ok += s.value;
      else if (s.name === "bnfold_inference_failure_total") get(l).failed += s.value;
      else if (s.name === "bnfold_request_duration_seconds_bucket") {
        const st = get(l);
        const le = l.le === "+Inf" ? Infinity : Number(l.le);
        st.buckets.set(le, (st.buckets.get(le) || 0) + s.value);
      }
    }
    return models;
  }

  // Prometheus' histogram_quantile: linear within the bucket holding the rank.
  function quantile(buckets, q) {
    const sorted = [...buckets.entries()].sort((a, b) => a[0] - b[0]);
    const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
    if (!total) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const [le, count] of sorted) {
      if (count >= rank) {
        if (le === Infinity) return lower;
        return count === below ? le : lower + ((le - lower) * (rank - below)) / (count - below);
      }
      lower = le;
      below = count;
    }
    return null;
  }

  // ------------------------------------------------------------------------------- V2 binary tensors
  const TYPED = {
    FP32: Float32Array,
    FP64: Float64Array,
    INT8: Int8Array,
    INT16: Int16Array,
    INT32: Int32Array,
    INT64: BigInt64Array,
    UINT8: Uint8Array,
    UINT16: Uint16Array,
    UINT32: Uint32Array,
    UINT64: BigUint64Array,
    BOOL: Uint8Array,
  };

  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }

  function decodeBinary(datatype, buffer) {
    if (datatype === "FP16") return Array.from(new Uint16Array(buffer), halfToFloat);
    if (datatype === "BYTES") {
      const view = new DataView(buffer);
      const out = [];
      const text = new TextDecoder();
      for (let off = 0; off + 4 <= buffer.byteLength; ) {
        const n = view.getUint32(off, true);
        out.push(text.decode(new Uint8Array(buffer, off + 4, n)));
        off += 4 + n;
      }
      return out;
    }
    const Typed = TYPED[datatype];
    if (!Typed) throw new Error(`cannot decode binary ${datatype}`);
    const values = Array.from(new Typed(buffer), (v) => (typeof v === "bigint" ? Number(v) : v));
    return datatype === "BOOL" ? values.map(Boolean) : values;
  }

  // Parse an inference response, JSON or binary-framed, into {outputs: [{name, datatype, shape, data}]}.
  async function readResponse(res) {
    const headerLength = res.headers.get("Inference-Header-Content-Length");
    if (headerLength === null) return res.json();
    const buffer = await res.arrayBuffer();
    const n = Number(headerLength);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 0, n)));
    let offset = n;
    for (const out of header.outputs || []) {
      const size = out.parameters && out.parameters.binary_data_size;
      if (size === undefined) continue;
      out.data = decodeBinary(out.datatype, buffer.slice(offset, offset + size));
      offset += size;
      delete out.parameters.binary_data_size;
    }
    return header;
  }

  async function infer(name, version, body, headers) {
    const started = performance.now();
    const res = await fetch(modelPath(name, version) + "/infer", {
      method: "POST",
      headers: authHeaders(headers),
      body,
      cache: "no-store",
    });
    if (!res.ok) throw await failure(res);
    const result = await readResponse(res);
    return { result, seconds: (performance.now() - started) / 1000 };
  }

  // One FP32/FP64 input sent as binary data; every output asked for as binary data.
  function binaryRequest(meta, input, shape, values) {
    const Typed = input.datatype === "FP64" ? Float64Array : Float32Array;
    const data = values instanceof Typed ? values : Typed.from(values);
    const header = {
      inputs: [{ name: input.name, shape, datatype: input.datatype, parameters: { binary_data_size: data.byteLength } }],
      outputs: meta.outputs.map((o) => ({ name: o.name, parameters: { binary_data: true } })),
    };
    const json = new TextEncoder().encode(JSON.stringify(header));
    return {
      body: new Blob([json, data]),
      headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(json.length) },
    };
  }

  function exampleRequest(meta) {
    const zero = { BOOL: false, BYTES: "" };
    return {
      inputs: meta.inputs.map((t) => {
        const shape = t.shape.map((d) => (d < 0 ? 1 : d));
        const count = shape.reduce((a, b) => a * b, 1);
        const fill = t.datatype in zero ? zero[t.datatype] : 0;
        return { name: t.name, shape, datatype: t.datatype, data: new Array(count).fill(fill) };
      }),
    };
  }

  // ---------------------------------------------------------------------------------- what to offer
  // A single FP32/FP64 input shaped [1,]C,H,W or [1,]H,W,C with C 1 or 3 and a fixed H and W is a picture:
  // small one-channel pictures get a drawing pad, the others a file upload. Anything else: the JSON editor.
  function pictureInput(meta, pre) {
    if (meta.inputs.length !== 1) return null;
    const input = meta.inputs[0];
    if (input.datatype !== "FP32" && input.datatype !== "FP64") return null;
    let dims = input.shape;
    if (dims.length === 4) {
      if (dims[0] !== 1 && dims[0] !== -1) return null;
      dims = dims.slice(1);
    } else if (dims.length !== 3) return null;
    let layout = pre.layout;
    if (!layout) {
      if (dims[0] === 3 || dims[0] === 1) layout = "NCHW";
      else if (dims[2] === 3 || dims[2] === 1) layout = "NHWC";
      else return null;
    }
    const [c, h, w] = layout === "NCHW" ? dims : [dims[2], dims[0], dims[1]];
    if ((c !== 1 && c !== 3) || h < 1 || w < 1) return null;
    const shape = input.shape.map((d) => (d < 0 ? 1 : d));
    const kind = c === 1 && h <= 64 && w <= 64 ? "draw" : "image";
    return { kind, input, shape, layout, c, h, w };
  }

  // planes[c][i] in 0..1 (i = y*w + x) -> the input tensor: times scale, then (x - mean[c]) / std[c].
  function tensorFrom(planes, spec, pre) {
    const { c, h, w, layout } = spec;
    const scale = pre.scale === undefined ? 1 : pre.scale;
    const mean = pre.mean || [0];
    const std = pre.std || [1];
    const out = new Float64Array(c * h * w);
    for (let ch = 0; ch < c; ch++) {
      const m = mean[mean.length === 1 ? 0 : ch];
      const s = std[std.length === 1 ? 0 : ch];
      const plane = planes[ch];
      for (let i = 0; i < h * w; i++) {
        const value = (plane[i] * scale - m) / s;
        out[layout === "NCHW" ? ch * h * w + i : i * c + ch] = value;
      }
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------- results
  function scoresOf(outputs, labels) {
    const numeric = outputs.filter((o) => Array.isArray(o.data) && o.data.length > 1 && typeof o.data[0] === "number");
    const out = numeric.find((o) => labels[o.name]) || numeric[0];
    if (!out) return null;
    const values = out.data.map(Number);
    const inUnit = values.every((v) => v >= 0 && v <= 1);
    const sum = values.reduce((a, b) => a + b, 0);
    let probs = values;
    if (!(inUnit && Math.abs(sum - 1) < 1e-3)) {
      const top = Math.max(...values);
      const exps = values.map((v) => Math.exp(v - top));
      const total = exps.reduce((a, b) => a + b, 0);
      probs = exps.map((v) => v / total);
    }
    const names = labels[out.name] || [];
    const ranked = probs.map((p, i) => ({ index: i, label: names[i] !== undefined ? names[i] : String(i), p }));
    ranked.sort((a, b) => b.p - a.p);
    return { output: out.name, softmax: probs !== values, top: ranked.slice(0, TOP_K) };
  }

  function rawView(result) {
    const outputs = (result.outputs || []).map((o) => {
      const copy = Object.assign({}, o);
      if (Array.isArray(o.data) && o.data.length > RAW_LIMIT) {
        copy.data = o.data.slice(0, RAW_LIMIT);
        copy.data_shown = `${RAW_LIMIT} of ${o.data.length}`;
      }
      return copy;
    });
    return JSON.stringify(Object.assign({}, result, { outputs }), null, 1);
  }

  class Result {
    constructor(id) {
      this.status = el("p", { class: "status", role: "status", "aria-live": "polite", id: id + "-status" }, "Not run yet");
      this.timing = el("p", { class: "muted timing" });
      this.bars = el("ol", { class: "bars", "aria-label": "Top classes" });
      this.raw = el("pre", { class: "raw", tabindex: "0" });
      this.node = el(
        "div",
        { class: "result" },
        this.status,
        this.bars,
        this.timing,
        el("details", {}, el("summary", {}, "Raw output"), this.raw),
      );
    }

    busy() {
      this.node.classList.add("busy");
    }

    error(err) {
      this.node.classList.remove("busy");
      this.status.textContent = describe(err);
      this.status.classList.add("error");
      this.bars.replaceChildren();
      this.timing.textContent = "";
    }

    done() {
      this.node.dataset.runs = String(Number(this.node.dataset.runs || 0) + 1);
    }

    show(result, seconds, how, labels) {
      this.node.classList.remove("busy");
      this.status.classList.remove("error");
      const scores = scoresOf(result.outputs || [], labels);
      if (scores) {
        const best = scores.top[0];
        this.status.textContent = `${best.label} (${best.p.toFixed(2)})`;
        this.bars.replaceChildren(
          ...scores.top.map((t) => {
            const fill = el("span", { class: "fill" });
            fill.style.width = `${(t.p * 100).toFixed(1)}%`;
            return el(
              "li",
              {},
              el("span", { class: "label", text: t.label }),
              el("span", { class: "bar", "aria-hidden": "true" }, fill),
              el("span", { class: "score", text: t.p.toFixed(2) }),
            );
          }),
        );
      } else {
        const names = (result.outputs || []).map((o) => `${o.name} ${shapeText(o.shape || [])}`);
        this.status.textContent = `done: ${names.join(", ")}`;
        this.bars.replaceChildren();
      }
      const note = scores && scores.softmax ? ` · scores: softmax of ${scores.output}` : "";
      this.timing.textContent = `round trip ${formatMs(seconds)} (${how})${note}`;
      this.raw.textContent = rawView(result);
    }
  }

  // ------------------------------------------------------------------------------------------ try it
  class DrawPad {
    // The model's h×w one-channel input as ink 0..1, drawn with a round brush on a canvas 16× finer and
    // averaged per cell (how the digits data set was made from 32×32 bitmaps); examples load exact values.
    constructor(card, spec) {
      this.card = card;
      this.spec = spec;
      const { h, w } = spec;
      this.fine = 16;
      this.base = new Float32Array(h * w); // loaded example or keyboard-painted cells
      this.ink = new Float32Array(h * w);
      this.cursor = 0;
      this.hi = document.createElement("canvas");
      this.hi.width = w * this.fine;
      this.hi.height = h * this.fine;
      this.hictx = this.hi.getContext("2d", { willReadFrequently: true });
      this.canvas = el("canvas", {
        class: "pad",
        width: String(w * 32),
        height: String(h * 32),
        tabindex: "0",
        role: "img",
        "aria-label": `Drawing pad, ${w} by ${h}: draw with mouse or touch; arrow keys move, Space paints, Delete erases`,
      });
      this.ctx = this.canvas.getContext("2d");
      this.canvas.addEventListener("pointerdown", (e) => this.down(e));
      this.canvas.addEventListener("pointermove", (e) => this.move(e));
      this.canvas.addEventListener("pointerup", (e) => this.up(e));
      this.canvas.addEventListener("pointercancel", (e) => this.up(e));
      this.canvas.addEventListener("keydown", (e) => this.key(e));
      this.canvas.addEventListener("focus", () => this.render());
      this.canvas.addEventListener("blur", () => this.render());
      this.last = null;
      this.render();
    }

    point(e) {
      const r = this.canvas.getBoundingClientRect();
      return [((e.clientX - r.left) / r.width) * this.hi.width, ((e.clientY - r.top) / r.height) * this.hi.height];
    }

    stroke(from, to) {
      const g = this.hictx;
      g.strokeStyle = "#000";
      g.fillStyle = "#000";
      g.lineCap = "round";
      g.lineJoin = "round";
      g.lineWidth = Math.max(this.hi.width, this.hi.height) / 6;
      g.beginPath();
      g.moveTo(from[0], from[1]);
      g.lineTo(to[0], to[1]);
      g.stroke();
      this.update();
      this.card.run(); // results follow the pen: one request in flight, the latest drawing sent next
    }

    down(e) {
      e.preventDefault();
      this.canvas.setPointerCapture(e.pointerId);
      this.last = this.point(e);
      this.stroke(this.last, this.last);
    }

    move(e) {
      if (!this.last) return;
      e.preventDefault();
      const p = this.point(e);
      this.stroke(this.last, p);
      this.last = p;
    }

    up() {
      this.last = null;
    }

    key(e) {
      const { h, w } = this.spec;
      let [x, y] = [this.cursor % w, Math.floor(this.cursor / w)];
      const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
      if (moves[e.key]) {
        x = Math.min(w - 1, Math.max(0, x + moves[e.key][0]));
        y = Math.min(h - 1, Math.max(0, y + moves[e.key][1]));
        this.cursor = y * w + x;
        this.render();
      } else if (e.key === " " || e.key === "Enter" || e.key === "Delete" || e.key === "Backspace") {
        const paint = e.key === " " || e.key === "Enter";
        this.base[this.cursor] = paint ? 1 : 0;
        if (!paint) this.hictx.clearRect(x * this.fine, y * this.fine, this.fine, this.fine);
        this.update();
        this.card.run();
      } else return;
      e.preventDefault();
    }

    update() {
      const { h, w } = this.spec;
      const f = this.fine;
      const alpha = this.hictx.getImageData(0, 0, w * f, h * f).data;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          let sum = 0;
          for (let dy = 0; dy < f; dy++) {
            const row = ((y * f + dy) * w * f + x * f) * 4 + 3;
            for (let dx = 0; dx < f; dx++) sum += alpha[row + dx * 4];
          }
          const i = y * w + x;
          this.ink[i] = Math.max(this.base[i], sum / (f * f * 255));
        }
      }
      this.render();
    }

    load(values, max) {
      this.hictx.clearRect(0, 0, this.hi.width, this.hi.height);
      values.forEach((v, i) => (this.base[i] = v / max));
      this.update();
    }

    clear() {
      this.base.fill(0);
      this.hictx.clearRect(0, 0, this.hi.width, this.hi.height);
      this.update();
    }

    render() {
      const { h, w } = this.spec;
      const cw = this.canvas.width / w;
      const ch = this.canvas.height / h;
      const g = this.ctx;
      g.fillStyle = "#fff";
      g.fillRect(0, 0, this.canvas.width, this.canvas.height);
      for (let i = 0; i < h * w; i++) {
        if (!this.ink[i]) continue;
        const shade = Math.round(255 * (1 - this.ink[i]));
        g.fillStyle = `rgb(${shade},${shade},${shade})`;
        g.fillRect((i % w) * cw, Math.floor(i / w) * ch, cw, ch);
      }
      if (document.activeElement === this.canvas) {
        g.strokeStyle = "#d9480f";
        g.lineWidth = 3;
        g.strokeRect((this.cursor % w) * cw + 1.5, Math.floor(this.cursor / w) * ch + 1.5, cw - 3, ch - 3);
      }
    }

    planes() {
      return [this.ink];
    }
  }

  class Upload {
    // A picture file, centre-cropped to the input's aspect ratio and resized to h×w in the browser.
    constructor(card, spec, id) {
      this.card = card;
      this.spec = spec;
      this.pixels = null;
      this.file = el("input", { type: "file", accept: "image/*", id: id + "-file" });
      this.preview = el("canvas", {
        class: "preview",
        width: String(spec.w),
        height: String(spec.h),
        role: "img",
        "aria-label": "Preview of the picture as the model gets it",
      });
      this.file.addEventListener("change", () => this.read());
      this.node = el(
        "div",
        { class: "upload" },
        el("label", { for: id + "-file" }, `Picture (resized to ${spec.w}×${spec.h})`),
        this.file,
        this.preview,
      );
    }

    async read() {
      const file = this.file.files && this.file.files[0];
      if (!file) return;
      const { h, w } = this.spec;
      let bitmap;
      try {
        bitmap = await createImageBitmap(file);
      } catch (err) {
        this.card.result.error(new Error(`cannot read ${file.name} as a picture`));
        return;
      }
      const aspect = w / h;
      let sw = bitmap.width;
      let sh = bitmap.height;
      if (sw / sh > aspect) sw = sh * aspect;
      else sh = sw / aspect;
      const g = this.preview.getContext("2d", { willReadFrequently: true });
      g.imageSmoothingQuality = "high";
      g.drawImage(bitmap, (bitmap.width - sw) / 2, (bitmap.height - sh) / 2, sw, sh, 0, 0, w, h);
      bitmap.close();
      this.pixels = g.getImageData(0, 0, w, h).data;
      this.card.run();
    }

    planes() {
      if (!this.pixels) return null;
      const { c, h, w } = this.spec;
      const px = this.pixels;
      const planes = [];
      for (let ch = 0; ch < c; ch++) planes.push(new Float32Array(h * w));
      for (let i = 0; i < h * w; i++) {
        const [r, g, b] = [px[i * 4] / 255, px[i * 4 + 1] / 255, px[i * 4 + 2] / 255];
        if (c === 3) [planes[0][i], planes[1][i], planes[2][i]] = [r, g, b];
        else planes[0][i] = 0.299 * r + 0.587 * g + 0.114 * b;
      }
      return planes;
    }
  }

  // ------------------------------------------------------------------------------------------- cards
  let cardCount = 0;

  class Card {
    constructor(name) {
      this.name = name;
      this.id = "m" + cardCount++;
      this.meta = null;
      this.labels = {};
      this.pre = {};
      this.running = false;
      this.again = false;
      this.badge = el("span", { class: "badge" }, "…");
      this.versionRows = el("tbody");
      this.body = el("div", { class: "card-body" }, el("p", { class: "muted" }, "loading metadata…"));
      this.node = el(
        "section",
        { class: "card", "aria-labelledby": this.id + "-h" },
        el("h2", { id: this.id + "-h" }, el("span", { class: "name", text: name }), " ", this.badge),
        this.body,
      );
    }

    async load() {
      try {
        const [meta, config] = await Promise.all([getJSON(modelPath(this.name)), getJSON(modelPath(this.name) + "/config")]);
        this.meta = meta;
        this.labels = (config.bnfold && config.bnfold.labels) || {};
        this.pre = (config.bnfold && config.bnfold.preprocessing) || {};
        await this.build();
        return null;
      } catch (err) {
        this.meta = null;
        this.failure = err;
        this.body.replaceChildren(el("p", { class: "error" }, describe(err)));
        return err;
      }
    }

    async build() {
      const meta = this.meta;
      const b = meta.bnfold || {};
      const facts = el(
        "div",
        { class: "facts" },
        el(
          "table",
          { class: "versions" },
          el("caption", {}, "Versions"),
          el(
            "thead",
            {},
            el("tr", {}, ["Version", "State", "Provider", "Requests", "Errors", "p50"].map((t) => el("th", { scope: "col" }, t))),
          ),
          this.versionRows,
        ),
        el(
          "table",
          { class: "tensors" },
          el("caption", {}, "Inputs and outputs"),
          el("thead", {}, el("tr", {}, ["", "Name", "Datatype", "Shape"].map((t) => el("th", { scope: "col" }, t)))),
          el(
            "tbody",
            {},
            meta.inputs.map((t) => tensorRow("in", t)),
            meta.outputs.map((t) => tensorRow("out", t)),
          ),
        ),
        el(
          "p",
          { class: "muted" },
          `Providers: ${(b.providers || []).join(", ") || "–"} · max batch size ${b.max_batch_size === undefined ? "–" : b.max_batch_size}`,
        ),
        b.quantization ? el("p", { class: "quantized" }, el("strong", {}, "Quantized: "), b.quantization) : null,
        foldView(b.folded),
      );
      this.result = new Result(this.id);
      this.body.replaceChildren(facts, await this.tryIt());
      if (this.stats) this.showStats(this.stats);
    }

    async tryIt() {
      const meta = this.meta;
      const spec = pictureInput(meta, this.pre);
      const runButton = el("button", { type: "button", class: "primary", onclick: () => this.run() }, "Run");
      const controls = el("div", { class: "controls" }, runButton);
      const versions = meta.versions || [];
      if (versions.length > 1) {
        this.versionSelect = el(
          "select",
          { id: this.id + "-version" },
          versions.map((v) => el("option", { value: v, selected: v === versions[versions.length - 1] }, v)),
        );
        controls.append(el("label", { for: this.id + "-version" }, "Version"), this.versionSelect);
      }
      const area = el("div", { class: "try" }, el("h3", {}, "Try it"));
      this.spec = spec;
      if (spec && spec.kind === "draw") {
        this.pad = new DrawPad(this, spec);
        const clear = el("button", { type: "button", onclick: () => (this.pad.clear(), this.run()) }, "Clear");
        controls.append(clear);
        area.append(el("div", { class: "pad-wrap" }, this.pad.canvas, await this.examples(spec)));
      } else if (spec) {
        this.upload = new Upload(this, spec, this.id);
        area.append(this.upload.node);
      } else {
        this.editor = el("textarea", { id: this.id + "-json", rows: "8", spellcheck: "false" });
        const inputs = exampleRequest(meta).inputs.map((t) => "  " + JSON.stringify(t));
        this.editor.value = `{"inputs": [\n${inputs.join(",\n")}\n]}`;
        area.append(el("label", { for: this.id + "-json" }, "Request (V2 JSON)"), this.editor);
      }
      area.append(controls, this.result.node);
      return area;
    }

    async examples(spec) {
      if (this.name !== "digits" || spec.h !== 8 || spec.w !== 8) return "";
      digitExamples = digitExamples || fetch("ui/digits.json").then((r) => (r.ok ? r.json() : null));
      const data = await digitExamples.catch(() => null);
      if (!data) return "";
      const buttons = data.examples.map((ex, i) => {
        const thumb = el("canvas", { width: "8", height: "8", "aria-hidden": "true" });
        const g = thumb.getContext("2d");
        ex.pixels.forEach((v, j) => {
          const shade = Math.round(255 * (1 - v / data.max));
          g.fillStyle = `rgb(${shade},${shade},${shade})`;
          g.fillRect(j % 8, Math.floor(j / 8), 1, 1);
        });
        return el(
          "button",
          {
            type: "button",
            class: "example",
            "aria-label": `Example ${i}`,
            title: `Example ${i}: a held-out ${ex.label} from the digits data set`,
            onclick: () => (this.pad.load(ex.pixels, data.max), this.run()),
          },
          thumb,
          el("span", {}, String(ex.label)),
        );
      });
      return el("div", { class: "examples", role: "group", "aria-label": "Examples" }, buttons);
    }

    // One request at a time per card; input changes while one runs are sent when it returns.
    async run() {
      if (!this.meta) return;
      if (this.running) {
        this.again = true;
        return;
      }
      this.running = true;
      this.result.busy();
      try {
        const version = this.versionSelect ? this.versionSelect.value : null;
        let request;
        let how = "binary tensors";
        if (this.pad || this.upload) {
          const planes = (this.pad || this.upload).planes();
          if (!planes) throw new Error("choose a picture first");
          const values = tensorFrom(planes, this.spec, this.pre);
          request = binaryRequest(this.meta, this.spec.input, this.spec.shape, values);
        } else {
          let parsed;
          try {
            parsed = JSON.parse(this.editor.value);
          } catch (err) {
            throw new Error(`the request is not valid JSON: ${err.message}`);
          }
          request = { body: JSON.stringify(parsed), headers: { "Content-Type": "application/json" } };
          how = "JSON";
        }
        const { result, seconds } = await infer(this.name, version, request.body, request.headers);
        this.result.show(result, seconds, how, this.labels);
      } catch (err) {
        this.result.error(err);
      } finally {
        this.running = false;
        this.result.done(); // data-runs: how many requests this card has finished (tests wait on it)
        scheduleRefresh();
      }
      if (this.again) {
        this.again = false;
        this.run();
      }
    }

    showStats(versions) {
      this.stats = versions;
      const names = Object.keys(versions).sort((a, b) => Number(a) - Number(b));
      const ready = names.some((v) => versions[v].ready);
      this.badge.textContent = ready ? "ready" : "not ready";
      this.badge.className = "badge " + (ready ? "ok" : "bad");
      this.versionRows.replaceChildren(
        ...names.map((v) => {
          const s = versions[v];
          return el(
            "tr",
            {},
            el("td", {}, v),
            el("td", { class: s.ready ? "ok" : "bad" }, s.ready ? "ready" : "not ready"),
            el("td", {}, s.provider || "–"),
            el("td", { class: "num" }, String(s.ok + s.failed)),
            el("td", { class: "num" }, String(s.failed)),
            el("td", { class: "num" }, formatMs(quantile(s.buckets, 0.5))),
          );
        }),
      );
    }
  }

  function tensorRow(kind, t) {
    return el(
      "tr",
      {},
      el("td", { class: "muted" }, kind),
      el("td", {}, el("code", {}, t.name)),
      el("td", {}, t.datatype),
      el("td", {}, shapeText(t.shape)),
    );
  }

  function foldView(folded) {
    if (!folded) return el("p", { class: "muted fold" }, "No BatchNormalization folded on load.");
    const v = folded.verification;
    const verified = v ? (v.passed ? ` · verified, max |Δ| ${v.max_abs.toExponential(1)}` : " · verification FAILED") : "";
    const total = folded.folded.length + folded.kept.length;
    return el(
      "details",
      { class: "fold", open: true },
      el("summary", {}, `Folded ${folded.folded.length} of ${total} BatchNorm${total === 1 ? "" : "s"}${verified}`),
      el(
        "ul",
        {},
        folded.folded.map((f) => el("li", {}, el("code", {}, f.name), ` → ${f.into}`)),
        folded.kept.map((k) => el("li", { class: "kept" }, el("code", {}, k.name), ` kept: ${k.reason}`)),
      ),
    );
  }

  // ------------------------------------------------------------------------------------ page refresh
  let refreshTimer = null;

  function scheduleRefresh(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, delay === undefined ? 300 : delay);
  }

  async function refresh() {
    clearTimeout(refreshTimer);
    try {
      const res = await fetch("metrics", { headers: authHeaders(), cache: "no-store" });
      if (!res.ok) throw await failure(res);
      const stats = modelStats(parseMetrics(await res.text()));
      const container = document.getElementById("models");
      const added = [];
      for (const name of Object.keys(stats).sort()) {
        let card = cards.get(name);
        if (!card) {
          card = new Card(name);
          cards.set(name, card);
          container.append(card.node);
          added.push(card);
        }
        card.showStats(stats[name]);
      }
      const empty = document.getElementById("no-models");
      if (!cards.size && !empty) container.append(el("p", { class: "muted", id: "no-models" }, "No model is loaded."));
      if (cards.size && empty) empty.remove();
      // new models, and those whose metadata failed for another reason than the key (not ready yet, say)
      const retry = [...cards.values()].filter((c) => !c.meta && !added.includes(c) && !isAuth(c.failure));
      await loadCards([...added, ...retry]);
    } catch (err) {
      notice(`Cannot read the server's metrics: ${describe(err)}`);
    }
    if (!document.hidden) refreshTimer = setTimeout(refresh, REFRESH_MS);
  }

  function isAuth(err) {
    return err instanceof HttpError && err.status === 401;
  }

  async function loadCards(list) {
    const errors = (await Promise.all(list.map((c) => c.load()))).filter(Boolean);
    const failed = [...cards.values()].some((c) => !c.meta);
    const auth = errors.find(isAuth);
    if (auth) notice(describe(auth));
    else if (!failed) notice("");
  }

  async function server() {
    const line = document.getElementById("server");
    try {
      const [meta, ready] = await Promise.all([
        getJSON("v2"),
        fetch("v2/health/ready", { cache: "no-store" }).then((r) => r.ok),
      ]);
      line.textContent = `${meta.name} ${meta.version} · ${ready ? "ready" : "not ready"} · extensions: ${meta.extensions.join(", ")}`;
    } catch (err) {
      line.textContent = `server: ${describe(err)}`;
    }
  }

  function useKey() {
    apiKey = document.getElementById("api-key").value.trim();
    loadCards([...cards.values()].filter((c) => !c.meta));
    scheduleRefresh(0); // the model list comes from /metrics, which needs the key too when one is set
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("auth").addEventListener("submit", (e) => {
      e.preventDefault(); // the key goes into a header, never into a URL
      useKey();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) scheduleRefresh(0);
    });
    server();
    refresh();
  });
})();
