/* caption serve's page: a dropped or chosen photo goes to POST v1/caption (multipart, with the beam
   and guide options); the answer, caption predict --json's shape, becomes the viewer's page data
   and window.captionViewer (viewer.js) draws it over the photo as the browser shows it (upright). */
(function () {
  "use strict";
  var base = JSON.parse(document.getElementById("data").textContent);
  var MAX_SIDE = 640, shown = null;

  function $(id) { return document.getElementById(id); }
  function flat(grid) { return [].concat.apply([], grid); }
  function hyp(r) { return {caption: r.caption, words: r.tokens, log_prob: r.log_prob, maps: r.attention.map(flat)}; }

  function pageData(name, src, size, rec) {
    var reading = {grid: rec.grid, init: rec.init_attention ? flat(rec.init_attention) : null, guide: rec.guide || null,
                   hyps: [hyp(rec)].concat((rec.alternatives || []).map(hyp))};
    return {title: base.title, gallery: false, labels: base.labels, errors: [], colormap: base.colormap,
            alpha: Number($("opacity").value),
            photos: [{name: name, src: src, width: size[0], height: size[1], models: [reading]}]};
  }

  // the photo's size on the page (upright, at most MAX_SIDE long), or null where the browser cannot show it
  function photoSize(url) {
    return new Promise(function (resolve) {
      var img = new Image();
      img.onload = function () {
        var w = img.naturalWidth, h = img.naturalHeight, s = Math.min(1, MAX_SIDE / Math.max(w, h));
        resolve([Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))]);
      };
      img.onerror = function () { resolve(null); };
      img.src = url;
    });
  }

  function placeholder(side) {  // a grey square for formats the browser cannot show (the map still is)
    var c = document.createElement("canvas");
    c.width = c.height = side;
    var ctx = c.getContext("2d");
    ctx.fillStyle = "#bbb"; ctx.fillRect(0, 0, side, side);
    return c.toDataURL("image/png");
  }

  function post(file) {
    var form = new FormData();
    form.append("image", file, file.name || "photo");
    form.append("beam", $("beam").value);
    form.append("guide", $("guide").checked ? "true" : "false");
    return fetch("v1/caption", {method: "POST", body: form}).then(function (r) {
      return r.text().then(function (text) {
        var body = null;
        try { body = JSON.parse(text); } catch (e) { body = {error: "HTTP " + r.status}; }
        return {ok: r.ok, body: body};
      });
    });
  }

  function status(text, failed) {
    $("status").textContent = text;
    $("status").classList.toggle("failed", !!failed);
  }

  function send(file) {
    if (!file) { return; }
    status("captioning " + file.name + " \u2026");
    var url = URL.createObjectURL(file);
    Promise.all([post(file), photoSize(url)]).then(function (got) {
      var answer = got[0], size = got[1];
      if (!answer.ok) { URL.revokeObjectURL(url); status(answer.body.error || "failed", true); return; }
      if (shown) { URL.revokeObjectURL(shown); }
      shown = url;
      var src = size ? url : placeholder(MAX_SIDE / 2);
      window.captionViewer.show(pageData(file.name, src, size || [MAX_SIDE / 2, MAX_SIDE / 2], answer.body));
      status(size ? "" : "(this browser cannot show the photo's format: the maps are drawn over a grey square)");
    }).catch(function (err) { URL.revokeObjectURL(url); status(String(err), true); });
  }

  $("file").addEventListener("change", function (e) { send(e.target.files[0]); });
  var drop = $("drop");
  ["dragenter", "dragover"].forEach(function (type) {
    document.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (type) {
    document.addEventListener(type, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  document.addEventListener("drop", function (e) { send(e.dataTransfer && e.dataTransfer.files[0]); });
})();
