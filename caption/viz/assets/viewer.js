/* The attention viewer (caption/viewer.py writes the page data into <script id="data">).
   Heatmaps are drawn here from the attention grids: bilinear upsampling with cell centres at
   the centres of the grid's rectangles (as Pillow's resize), coloured with the PNG overlays'
   colormap table on their scale (data.scale "uniform": weight x cells on one log scale from 1 = flat
   to data.scale_max, the same for every word and photo; "minmax": each map stretched to its own
   range), shown over the photo at the opacity of the slider, with the scale's legend.
   window.captionViewer.show(data) draws other page data of the same shape (caption serve's page). */
(function () {
  "use strict";
  var data = null, photos = [], lut = [];
  var state = {photo: -1, pos: 0, hyp: [], compare: true, preview: null};
  var columns = [];

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, v)); }

  // ------------------------------------------------------------------ heatmaps

  function axis(n, cells) {
    // output pixel x samples the grid at (x + 0.5) * cells / n - 0.5, clamped at the edges
    var i0 = new Int32Array(n), i1 = new Int32Array(n), f = new Float32Array(n);
    for (var x = 0; x < n; x++) {
      var s = clamp((x + 0.5) * cells / n - 0.5, 0, cells - 1), a = Math.floor(s);
      i0[x] = a; i1[x] = Math.min(a + 1, cells - 1); f[x] = s - a;
    }
    return {i0: i0, i1: i1, f: f};
  }

  // colour index (0..255) of a heat value: weight x cells on the fixed log scale, or min-max stretched
  function colourIndex(v, lo, span) {
    if (data.scale === "minmax") { return span ? Math.min(255, Math.floor((v - lo) / span * 256)) : 0; }
    var t = Math.log(Math.max(v, 1e-12)) / Math.log(data.scale_max);
    return Math.min(255, Math.max(0, Math.floor(t * 256)));
  }

  function paint(canvas, cells, grid, W, H) {
    canvas.width = W; canvas.height = H;
    var ctx = canvas.getContext("2d");
    if (!cells) { ctx.clearRect(0, 0, W, H); return; }
    var gh = grid[0], gw = grid[1], xs = axis(W, gw), ys = axis(H, gh), unit = data.cell_unit || 1;
    var heat = new Float32Array(W * H), lo = Infinity, hi = -Infinity;
    for (var y = 0; y < H; y++) {
      var r0 = ys.i0[y] * gw, r1 = ys.i1[y] * gw, fy = ys.f[y];
      for (var x = 0; x < W; x++) {
        var a = xs.i0[x], b = xs.i1[x], fx = xs.f[x];
        var top = cells[r0 + a] + fx * (cells[r0 + b] - cells[r0 + a]);
        var bot = cells[r1 + a] + fx * (cells[r1 + b] - cells[r1 + a]);
        var v = (top + fy * (bot - top)) * gh * gw / unit;  // weight against a flat map's: 1 = flat
        heat[y * W + x] = v;
        if (v < lo) { lo = v; }
        if (v > hi) { hi = v; }
      }
    }
    var img = ctx.createImageData(W, H), px = img.data, span = hi - lo > 1e-9 ? hi - lo : 0;
    for (var i = 0; i < W * H; i++) {
      var k = colourIndex(heat[i], lo, span) * 3;
      px[4 * i] = lut[k]; px[4 * i + 1] = lut[k + 1]; px[4 * i + 2] = lut[k + 2]; px[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  // ------------------------------------------------------------------ one photo, one column per model

  function hypOf(c) { return c.reading.hyps[state.hyp[c.model]]; }
  function visible(c) { return c.model === 0 || state.compare; }
  function ownPos(c) { return clamp(state.pos, c.reading.init ? -1 : 0, hypOf(c).words.length - 1); }

  function wordSpan(c, pos, text) {
    var s = el("span", pos < 0 ? "word init" : "word", text);
    s.setAttribute("data-pos", String(pos));
    s.setAttribute("role", "button");
    s.tabIndex = 0;
    s.addEventListener("mouseenter", function () { state.preview = {model: c.model, pos: pos}; render(); });
    s.addEventListener("mouseleave", function () { state.preview = null; render(); });
    s.addEventListener("click", function () { setPos(pos); });
    s.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { setPos(pos); e.preventDefault(); e.stopPropagation(); }
    });
    return s;
  }

  function showWords(c) {
    var h = hypOf(c), k = state.hyp[c.model];
    c.caption.textContent = "";
    if (c.reading.init) { c.caption.appendChild(wordSpan(c, -1, "before the first word")); c.caption.append(" "); }
    h.words.forEach(function (w, i) { c.caption.appendChild(wordSpan(c, i, w)); c.caption.append(" "); });
    c.meta.textContent = "log p = " + h.log_prob.toFixed(3) + (k ? "  (beam runner-up " + k + ")" : "");
    Array.prototype.forEach.call(c.hyps.children, function (li, j) { li.classList.toggle("active", j === k); });
  }

  // what the encoder's ImageNet classifier saw, and the name it made the caption say (null: no guide)
  function guideText(g) {
    if (!g || !g.labels.length) { return null; }
    var text = "ImageNet: " + g.labels.map(function (l) { return l.label + " " + l.p.toFixed(2); }).join(", ");
    if (g.constraint && g.shaped) { text += " \u2014 guided to name it (\u201c" + g.constraint + "\u201d)"; }
    else if (g.no_people && g.shaped) { text += " \u2014 guided: no people"; }
    return text;
  }

  function buildColumn(photo, reading, m) {
    var c = {model: m, reading: reading, el: el("div", "column")};
    c.el.setAttribute("data-model", String(m));
    if (data.labels.length > 1) { c.el.appendChild(el("h2", "label", data.labels[m])); }
    var stage = el("div", "stage");
    c.img = el("img", "photo");
    c.img.alt = photo.name;
    c.img.src = photo.src;
    c.canvas = el("canvas", "heat");
    stage.appendChild(c.img); stage.appendChild(c.canvas);
    c.caption = el("p", "caption");
    c.meta = el("p", "meta");
    c.hyps = el("ol", "hyps");
    reading.hyps.forEach(function (h, k) {
      var li = el("li", "hyp", h.caption);
      li.appendChild(el("span", "lp", "log p " + h.log_prob.toFixed(3)));
      li.setAttribute("data-hyp", String(k));
      li.addEventListener("click", function () {
        state.hyp[m] = k; state.preview = null; showWords(c); render();
      });
      c.hyps.appendChild(li);
    });
    var title = el("p", "hyps-title", "beam search: " + reading.hyps.length + " captions, best first");
    title.hidden = c.hyps.hidden = reading.hyps.length < 2;
    var guide = el("p", "guide", guideText(reading.guide) || "");
    guide.hidden = !reading.guide;
    [stage, c.caption, guide, c.meta, title, c.hyps].forEach(function (e) { c.el.appendChild(e); });
    return c;
  }

  function layout() {
    if (state.photo < 0) { return; }
    var photo = photos[state.photo], shown = columns.filter(visible);
    var avail = document.documentElement.clientWidth - 48 - 24 * (shown.length - 1);
    var maxW = Math.min(640, Math.max(120, avail / shown.length));
    var maxH = Math.min(640, Math.max(160, window.innerHeight * 0.62));
    var scale = Math.min(maxW / photo.width, maxH / photo.height);
    columns.forEach(function (c) {
      c.img.style.width = Math.round(photo.width * scale) + "px";
      c.img.style.height = Math.round(photo.height * scale) + "px";
    });
  }

  function render() {
    if (state.photo < 0) { return; }
    var photo = photos[state.photo];
    columns.forEach(function (c) {
      c.el.hidden = !visible(c);
      if (c.el.hidden) { return; }
      var own = ownPos(c), p = state.preview && state.preview.model === c.model ? state.preview.pos : own;
      paint(c.canvas, p < 0 ? c.reading.init : hypOf(c).maps[p], c.reading.grid, photo.width, photo.height);
      c.canvas.setAttribute("data-pos", String(p));
      Array.prototype.forEach.call(c.caption.querySelectorAll(".word"), function (s) {
        var on = Number(s.getAttribute("data-pos")) === own;
        s.classList.toggle("active", on);
        s.setAttribute("aria-pressed", on ? "true" : "false");
      });
    });
    layout();
  }

  function setPos(p) {
    var shown = columns.filter(visible), lo = 0, hi = 0;
    shown.forEach(function (c) {
      if (c.reading.init) { lo = -1; }
      hi = Math.max(hi, hypOf(c).words.length - 1);
    });
    state.pos = clamp(p, lo, hi);
    state.preview = null;
    render();
  }

  function open(i) {
    var photo = photos[i];
    state.photo = i; state.pos = 0; state.preview = null;
    state.hyp = photo.models.map(function () { return 0; });
    $("grid").hidden = true;
    $("detail").hidden = false;
    $("counter").textContent = (i + 1) + " / " + photos.length;
    $("name").textContent = photo.name;
    var box = $("columns");
    box.textContent = "";
    columns = photo.models.map(function (reading, m) { return buildColumn(photo, reading, m); });
    columns.forEach(function (c) { box.appendChild(c.el); showWords(c); });
    render();
    if (data.gallery) { window.scrollTo(0, 0); }
  }

  function close() {
    var i = state.photo;
    state.photo = -1;
    $("detail").hidden = true;
    $("grid").hidden = false;
    var card = document.querySelector('.card[data-index="' + i + '"]');
    if (card) { card.focus(); card.scrollIntoView({block: "center"}); }
  }

  // ------------------------------------------------------------------ the page

  function buildGrid() {
    var grid = $("grid");
    grid.textContent = "";
    photos.forEach(function (p, i) {
      var card = el("figure", "card");
      card.tabIndex = 0;
      card.title = p.name;
      card.setAttribute("data-index", String(i));
      var img = el("img");
      img.src = p.src; img.alt = p.name;
      var cap = el("figcaption");
      cap.appendChild(el("span", "first", p.models[0].hyps[0].caption));
      var g = p.models[0].guide;
      if (g && g.labels.length) { cap.appendChild(el("span", "label", g.labels[0].label)); }
      if (p.models.length > 1) { cap.appendChild(el("span", "second", p.models[1].hyps[0].caption)); }
      card.appendChild(img); card.appendChild(cap);
      card.addEventListener("click", function () { open(i); });
      card.addEventListener("keydown", function (e) { if (e.key === "Enter") { open(i); e.preventDefault(); } });
      grid.appendChild(card);
    });
    grid.hidden = false;
  }

  document.addEventListener("keydown", function (e) {
    if (state.photo < 0 || e.target.tagName === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) { return; }
    var k = e.key, n = photos.length;
    if (k === "ArrowRight") { setPos(state.pos + 1); }
    else if (k === "ArrowLeft") { setPos(state.pos - 1); }
    else if (data.gallery && (k === "ArrowDown" || k === "PageDown")) { open(Math.min(n - 1, state.photo + 1)); }
    else if (data.gallery && (k === "ArrowUp" || k === "PageUp")) { open(Math.max(0, state.photo - 1)); }
    else if (data.gallery && k === "Escape") { close(); }
    else { return; }
    e.preventDefault();
  });

  function setOpacity(v) { document.body.style.setProperty("--alpha", String(v)); }
  $("opacity").addEventListener("input", function (e) { setOpacity(e.target.value); });
  $("compare").addEventListener("change", function (e) {
    state.compare = e.target.checked;
    document.body.classList.toggle("no-compare", !state.compare);
    state.preview = null;
    render();
  });
  $("back").addEventListener("click", close);
  $("prev").addEventListener("click", function () { open(Math.max(0, state.photo - 1)); });
  $("next").addEventListener("click", function () { open(Math.min(photos.length - 1, state.photo + 1)); });
  window.addEventListener("resize", layout);

  // draw one page's data (the one in <script id="data">, or another given later)
  // the colour scale under the controls: what a colour means on this page's scale
  function drawScale() {
    var bar = $("scale-bar"), W = 256;
    bar.width = W; bar.height = 12;
    var ctx = bar.getContext("2d"), img = ctx.createImageData(W, 12);
    for (var x = 0; x < W; x++) {
      for (var y = 0; y < 12; y++) {
        var i = 4 * (y * W + x);
        img.data[i] = lut[3 * x]; img.data[i + 1] = lut[3 * x + 1]; img.data[i + 2] = lut[3 * x + 2]; img.data[i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    var minmax = data.scale === "minmax";
    $("scale-lo").textContent = minmax ? "lowest" : "1\u00d7 = flat";
    $("scale-hi").textContent = minmax ? "highest (each map stretched: not comparable across words)"
                                       : data.scale_max + "\u00d7 a flat map's weight";
  }

  function show(d) {
    data = d; photos = d.photos; lut = d.colormap;
    data.scale = d.scale || "uniform"; data.scale_max = d.scale_max || 16;
    drawScale();
    state.photo = -1;
    $("opacity").value = String(d.alpha);
    setOpacity(d.alpha);
    $("compare-toggle").hidden = d.labels.length < 2;
    $("legend").textContent = "";
    if (d.labels.length > 1) {
      d.labels.forEach(function (label, m) { $("legend").appendChild(el("span", m ? "second" : "first", label)); });
    }
    $("legend").hidden = d.labels.length < 2;
    var list = $("errors");
    list.textContent = "";
    d.errors.forEach(function (line) { list.appendChild(el("li", "", "could not caption " + line)); });
    list.hidden = !d.errors.length;
    document.body.classList.toggle("gallery", d.gallery);
    $("nav").hidden = !d.gallery;
    $("grid").hidden = $("detail").hidden = true;
    if (d.gallery) { buildGrid(); }
    else if (photos.length) { open(0); }
  }

  window.captionViewer = {show: show};
  show(JSON.parse($("data").textContent));
})();
