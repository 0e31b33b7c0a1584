// The workbench's notebook viewer (anywidget ESM, no dependencies, no network).
// Asks the kernel for the slices in view ({type: "slice", axis, index}); each reply holds
// one uint8 plane per channel (deflate-compressed), composed here with the manifest's
// look-up tables; shard boundaries are drawn from the shard boxes, one colour per shard.

const AXES = ["z", "y", "x"];
// view of axis a shows (rows, cols) = these volume axes
const PLANE = [[1, 2], [0, 2], [0, 1]];

async function inflate(view, codec) {
  const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  if (codec !== "deflate") return bytes.slice();
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  return Math.abs(v) >= 1e-2 && Math.abs(v) < 1e4 ? v.toFixed(3) : v.toExponential(2);
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function render({ model, el: root }) {
  const man = model.get("manifest");
  const shape = man.shape, spacing = man.spacing;
  const channels = man.channels;
  const luts = {};
  for (const c of channels) {
    luts[c.name] = Uint8Array.from(c.lut);
    if (c.abs_lut) luts[c.name + ":abs"] = Uint8Array.from(c.abs_lut);
  }
  const shards = man.shards.filter((s) => !s.empty);
  const views = [0, 1, 2].map((axis) => ({
    axis, data: null, pending: false, sentAt: 0, seq: 0, canvas: null, slider: null, label: null,
  }));
  let seq = 0;
  let hover = null; // [z, y, x] under the cursor

  // -- layout ------------------------------------------------------------------------------
  const box = el("div", { class: "wbv" });
  const title = el("div", { class: "wbv-title" });
  title.textContent = `${man.title ? man.title + " · " : ""}${shape.join("×")} voxels · mesh ` +
    `${man.mesh.z}×${man.mesh.y}×${man.mesh.x} · ${man.shards.length} shards` +
    (man.max_abs_diff !== null ? ` · max |Δ| ${fmt(man.max_abs_diff)}` : "");
  const row = el("div", { class: "wbv-views" });
  for (const v of views) {
    const [ra, ca] = PLANE[v.axis];
    v.label = el("div", { class: "wbv-label" });
    v.canvas = el("canvas", { class: "wbv-canvas", "data-axis": String(v.axis) });
    v.slider = el("input", { type: "range", min: "0", max: String(shape[v.axis] - 1), step: "1",
      class: "wbv-slider", "data-axis": String(v.axis), "aria-label": `${AXES[v.axis]} slice` });
    v.rowsAxis = ra; v.colsAxis = ca;
    row.appendChild(el("div", { class: "wbv-view", "data-axis": String(v.axis) }, [v.label, v.canvas, v.slider]));
  }
  const info = el("div", { class: "wbv-info", text: "move the mouse over a slice" });
  const controls = el("div", { class: "wbv-controls" });
  const table = el("table", { class: "wbv-shards" });
  box.append(title, row, info, controls, table);
  // keys typed here (arrows on a slider) are the viewer's, not JupyterLab's shortcuts
  box.setAttribute("data-lm-suppress-shortcuts", "true");
  box.addEventListener("keydown", (e) => e.stopPropagation());
  root.appendChild(box);

  // -- geometry ----------------------------------------------------------------------------
  function geometry(v) {
    const rows = shape[v.rowsAxis], cols = shape[v.colsAxis];
    const hmm = rows * spacing[v.rowsAxis], wmm = cols * spacing[v.colsAxis];
    const size = model.get("size");
    const s = size / Math.max(hmm, wmm);
    return { rows, cols, width: Math.max(1, Math.round(wmm * s)), height: Math.max(1, Math.round(hmm * s)) };
  }
  const px = (g, c) => Math.round((c * g.width) / g.cols);
  const py = (g, r) => Math.round((r * g.height) / g.rows);

  // -- drawing -----------------------------------------------------------------------------
  function compose(v) {
    const { rows, cols, planes } = v.data;
    const visible = model.get("visible"), opacity = model.get("opacity");
    const n = rows * cols;
    const out = new ImageData(cols, rows);
    const o = out.data;
    // the background: the input channel ticked (one at a time; "image" for one channel)
    const shownImage = channels.find((c) => c.kind === "image" && visible[c.name] && planes[c.name]);
    const image = shownImage ? planes[shownImage.name] : null;
    const gray = shownImage ? luts[shownImage.name] : null;
    for (let p = 0; p < n; p++) {
      const q = image ? image[p] * 4 : 0;
      o[4 * p] = image ? gray[q] : 0; o[4 * p + 1] = image ? gray[q + 1] : 0;
      o[4 * p + 2] = image ? gray[q + 2] : 0; o[4 * p + 3] = 255;
    }
    for (const c of channels) {
      if (c.kind === "image" || !visible[c.name] || !planes[c.name]) continue;
      const plane = planes[c.name];
      const lut = c.kind === "error" && model.get("error_mode") === "abs" ? luts[c.name + ":abs"] : luts[c.name];
      const op = opacity[c.name] ?? c.opacity;
      const contour = c.style === "contour";
      for (let p = 0; p < n; p++) {
        const value = plane[p];
        if (contour) {
          const x = p % cols, y = (p - x) / cols;
          const right = x + 1 < cols ? plane[p + 1] : value, down = y + 1 < rows ? plane[p + cols] : value;
          if (value === right && value === down) continue;
        }
        const shown = contour && value === 0 ? Math.max(plane[p + 1] || 0, plane[p + cols] || 0) : value;
        const a = (lut[4 * shown + 3] / 255) * op;
        if (a <= 0) continue;
        for (let k = 0; k < 3; k++) o[4 * p + k] = o[4 * p + k] * (1 - a) + lut[4 * shown + k] * a;
      }
    }
    return out;
  }

  function draw(v) {
    if (!v.data) return;
    const g = geometry(v);
    const canvas = v.canvas;
    if (canvas.width !== g.width || canvas.height !== g.height) { canvas.width = g.width; canvas.height = g.height; }
    const ctx = canvas.getContext("2d");
    const off = v.off || (v.off = document.createElement("canvas"));
    off.width = v.data.cols; off.height = v.data.rows;
    off.getContext("2d").putImageData(compose(v), 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, g.width, g.height);
    const visible = model.get("visible");
    const pos = model.get("position");
    const index = v.data.index;
    if (visible.crosshair) {
      ctx.fillStyle = "rgba(255, 255, 255, 0.35)";
      const x = px(g, pos[v.colsAxis] + 0.5), y = py(g, pos[v.rowsAxis] + 0.5);
      for (let t = 0; t < g.width; t += 6) ctx.fillRect(t, y, 3, 1);
      for (let t = 0; t < g.height; t += 6) ctx.fillRect(x, t, 1, 3);
    }
    if (visible.boundaries) {
      const w = Math.max(1, Math.min(3, Math.round(Math.min(g.width, g.height) / 160)));
      for (const s of shards) {
        const [lo, hi] = s.box[v.axis];
        if (index < lo || index >= hi) continue;
        const x0 = px(g, s.box[v.colsAxis][0]), x1 = px(g, s.box[v.colsAxis][1]);
        const y0 = py(g, s.box[v.rowsAxis][0]), y1 = py(g, s.box[v.rowsAxis][1]);
        ctx.fillStyle = s.color; // drawn inside the box: two shards meet as two colours
        ctx.fillRect(x0, y0, x1 - x0, w); ctx.fillRect(x0, y1 - w, x1 - x0, w);
        ctx.fillRect(x0, y0, w, y1 - y0); ctx.fillRect(x1 - w, y0, w, y1 - y0);
      }
      canvas.dataset.lineWidth = String(w);
    }
    v.label.textContent = `${AXES[v.axis]} = ${index} / ${shape[v.axis] - 1}`;
    canvas.dataset.geometry = JSON.stringify({ axis: v.axis, index, rows: g.rows, cols: g.cols,
      width: g.width, height: g.height, rowsAxis: v.rowsAxis, colsAxis: v.colsAxis });
    canvas.dataset.index = String(index);
    if (v.sentAt) { canvas.dataset.ms = (performance.now() - v.sentAt).toFixed(1); v.sentAt = 0; }
  }

  function drawAll() { for (const v of views) draw(v); }

  // -- data from the kernel ------------------------------------------------------------------
  // only the channels shown travel; a channel switched on later is fetched then
  const shown = () => { const vis = model.get("visible"); return channels.filter((c) => vis[c.name]).map((c) => c.name); };
  function request(v) {
    const want = model.get("position")[v.axis];
    const same = v.data && v.data.index === want;
    const ask = shown().filter((name) => !same || !(name in v.data.planes));
    if (same && !ask.length) { draw(v); return; }
    if (v.pending) return; // the reply asks again if the slider moved meanwhile
    v.pending = true; v.seq = ++seq; v.sentAt = v.askedAt = performance.now();
    model.send({ type: "slice", axis: v.axis, index: want, channels: ask, seq: v.seq });
  }

  async function receive(msg, buffers) {
    if (!msg || msg.type !== "slice") return;
    const v = views[msg.axis];
    const same = v.data && v.data.index === msg.index;
    const planes = same ? v.data.planes : {};
    const decoded = await Promise.all(buffers.map((b) => inflate(b, msg.codec)));
    msg.channels.forEach((name, i) => { planes[name] = decoded[i]; });
    v.data = { index: msg.index, rows: msg.rows, cols: msg.cols, planes };
    v.pending = false;
    draw(v);
    const rendered = { ...model.get("rendered") };
    rendered[AXES[v.axis]] = msg.index;
    model.set("rendered", rendered); model.save_changes();
    request(v); // the slider moved or a channel was switched on meanwhile
  }
  model.on("msg:custom", receive);
  // A kernel running a Qt event loop (napari opened in it) handles messages that arrive
  // together only when the next one comes: a request unanswered for 1.5 s gets a nudge.
  const nudge = setInterval(() => {
    if (views.some((v) => v.pending && performance.now() - v.askedAt > 1500)) model.send({ type: "nudge" });
  }, 1500);

  function setPosition(changes) {
    const pos = [...model.get("position")];
    for (const [axis, value] of Object.entries(changes)) pos[axis] = Math.max(0, Math.min(shape[axis] - 1, value));
    model.set("position", pos); model.save_changes();
    onPosition();
  }
  function onPosition() {
    const pos = model.get("position");
    for (const v of views) { v.slider.value = String(pos[v.axis]); request(v); }
    drawAll(); // crosshairs move in the other views
    showInfo();
  }
  model.on("change:position", onPosition);
  for (const name of ["visible", "opacity", "error_mode", "size"]) model.on(`change:${name}`, () => { syncControls(); drawAll(); });
  model.on("change:visible", () => { for (const v of views) request(v); });

  // -- interaction ---------------------------------------------------------------------------
  function voxelAt(v, event) {
    if (!v.data) return null;
    const g = geometry(v);
    const rect = v.canvas.getBoundingClientRect();
    const c = Math.floor(((event.clientX - rect.left) / rect.width) * g.cols);
    const r = Math.floor(((event.clientY - rect.top) / rect.height) * g.rows);
    if (c < 0 || r < 0 || c >= g.cols || r >= g.rows) return null;
    const voxel = [0, 0, 0];
    voxel[v.axis] = v.data.index; voxel[v.rowsAxis] = r; voxel[v.colsAxis] = c;
    return { voxel, r, c };
  }
  for (const v of views) {
    v.slider.addEventListener("input", () => setPosition({ [v.axis]: Number(v.slider.value) }));
    v.canvas.addEventListener("mousemove", (e) => { const h = voxelAt(v, e); hover = h && h.voxel; showInfo(v, h); });
    v.canvas.addEventListener("mouseleave", () => { hover = null; showInfo(); });
    v.canvas.addEventListener("click", (e) => {
      const h = voxelAt(v, e);
      if (h) setPosition({ [v.rowsAxis]: h.r, [v.colsAxis]: h.c });
    });
    v.canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      setPosition({ [v.axis]: model.get("position")[v.axis] + (e.deltaY > 0 ? 1 : -1) });
    }, { passive: false });
  }

  function shardAt(voxel) {
    return man.shards.find((s) => s.box.every(([lo, hi], a) => voxel[a] >= lo && voxel[a] < hi));
  }
  function valueText(c, q) {
    if (c.kind === "image") return `${c.name} ${fmt(c.limits[0] + (q / 255) * (c.limits[1] - c.limits[0]))}`;
    if (c.kind === "error") return `Δ ≈ ${fmt(((q - 128) / 127) * c.limits[1])}`;
    if (c.kind === "labels" && c.region) return `${c.name} ${q ? "inside" : "outside"}`;
    if (c.kind === "labels") return `${c.name} ${man.class_names[q] ?? q}`;
    return q ? `halo of shard ${q - 1}` : "";
  }
  function showInfo(v, h) {
    const voxel = hover || model.get("position");
    const shard = shardAt(voxel);
    const parts = [`z ${voxel[0]} y ${voxel[1]} x ${voxel[2]}`];
    if (v && h && v.data) {
      const p = h.r * v.data.cols + h.c;
      for (const c of channels) {
        const plane = v.data.planes[c.name];
        if (plane) { const t = valueText(c, plane[p]); if (t) parts.push(t); }
      }
    }
    if (shard) {
      parts.push(`shard ${shard.index} (z${shard.coords[0]} y${shard.coords[1]} x${shard.coords[2]})` +
        (shard.max_abs_diff !== undefined ? `: max |Δ| ${fmt(shard.max_abs_diff)}, mean |Δ| ${fmt(shard.mean_abs_diff)}` : ""));
    }
    info.textContent = parts.join(" · ");
    info.dataset.shard = shard ? String(shard.index) : "";
    for (const tr of table.querySelectorAll("tr[data-shard]")) tr.classList.toggle("wbv-here", shard && tr.dataset.shard === String(shard.index));
  }

  // -- controls and the shard table ------------------------------------------------------------
  const inputs = {};
  function toggle(name, label, withOpacity) {
    const check = el("input", { type: "checkbox", "data-overlay": name });
    check.addEventListener("change", () => {
      const next = { ...model.get("visible"), [name]: check.checked };
      // input channels are a selector: ticking one unticks the others
      if (check.checked && channels.some((c) => c.name === name && c.kind === "image"))
        for (const c of channels) if (c.kind === "image" && c.name !== name) next[c.name] = false;
      model.set("visible", next); model.save_changes();
      for (const v of views) request(v);
      drawAll();
    });
    const item = el("label", { class: "wbv-toggle" }, [check, document.createTextNode(" " + label)]);
    inputs[name] = { check };
    if (withOpacity) {
      const range = el("input", { type: "range", min: "0", max: "100", class: "wbv-opacity", "data-opacity": name, "aria-label": `${label} opacity` });
      range.addEventListener("input", () => { model.set("opacity", { ...model.get("opacity"), [name]: Number(range.value) / 100 }); model.save_changes(); drawAll(); });
      item.appendChild(range); inputs[name].range = range;
    }
    controls.appendChild(item);
  }
  for (const c of channels) toggle(c.name, c.label, c.kind !== "image");
  toggle("boundaries", "shard boundaries", false);
  toggle("crosshair", "crosshair", false);
  let mode = null;
  if (channels.some((c) => c.kind === "error")) {
    mode = el("select", { class: "wbv-error-mode", "aria-label": "error map" },
      [el("option", { value: "abs", text: "|Δ|" }), el("option", { value: "signed", text: "signed Δ" })]);
    mode.addEventListener("change", () => { model.set("error_mode", mode.value); model.save_changes(); drawAll(); });
    controls.appendChild(mode);
  }
  function syncControls() {
    const visible = model.get("visible"), opacity = model.get("opacity");
    for (const [name, i] of Object.entries(inputs)) {
      i.check.checked = !!visible[name];
      if (i.range) i.range.value = String(Math.round(100 * (opacity[name] ?? 1)));
    }
    if (mode) mode.value = model.get("error_mode");
  }

  const stats = man.shards.some((s) => s.max_abs_diff !== undefined);
  const head = ["", "shard", "z y x", "voxels (z, y, x)"].concat(stats ? ["max |Δ|", "mean |Δ|", `> ${fmt(man.tolerance)}`] : []);
  table.appendChild(el("tr", {}, head.map((t) => el("th", { text: t }))));
  for (const s of man.shards) {
    const cells = [el("td", {}, [el("span", { class: "wbv-swatch", style: `background:${s.color}` })]),
      el("td", { text: String(s.index) }), el("td", { text: s.coords.join(" ") }),
      el("td", { text: s.empty ? "padding only" : s.box.map(([a, b]) => `${a}–${b}`).join(", ") })];
    if (stats) for (const k of ["max_abs_diff", "mean_abs_diff", "voxels_over_tolerance"]) cells.push(el("td", { text: fmt(s[k]) }));
    const tr = el("tr", { "data-shard": String(s.index) }, cells);
    if (!s.empty) tr.addEventListener("click", () => setPosition(Object.fromEntries(s.box.map(([a, b], i) => [i, Math.floor((a + b) / 2)]))));
    table.appendChild(tr);
  }

  syncControls();
  onPosition();
  return () => { clearInterval(nudge); model.off("msg:custom", receive); };
}

export default { render };
