// cae-service demo page: plain JS against the public routes (no framework, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { card: null, image: null, gallery: null, galleryVectors: null, runs: 0 };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = `${r.status}`;
    try { const e = (await r.json()).error; msg = `${r.status} ${e.code}: ${e.message}`; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function setPanel(name, stateName, note) {
  const panel = $(`panel-${name}`);
  panel.dataset.state = stateName;
  panel.querySelector(".note").textContent = note || "";
}

function status(text) { $("status").textContent = text; }

async function loadModel() {
  try {
    state.card = (await (await call("/v1/models")).json()).data[0];
  } catch (e) {
    $("model").textContent = `model unavailable (${e.message})`;
    status(e.message.startsWith("401") ? "This server needs an API key: enter it above." : e.message);
    return false;
  }
  const c = state.card;
  $("model").textContent = `${c.id} · ${c.tasks.join(", ")} · ${c.backend.name}`;
  const absent = { reconstruct: "this model has no pixel reconstruction graph",
                   segment: "this model has no segmentation head", detect: "this model has no detection head" };
  for (const task of ["reconstruct", "segment", "detect"]) {
    if (!c.tasks.includes(task)) setPanel(task, "off", c.unavailable_tasks[task] || absent[task]);
  }
  if (!c.tasks.includes("embed")) setPanel("neighbours", "off", "this model has no embed graph");
  return true;
}

function sampleImage() {
  // a small synthetic scene: a few coloured shapes on a gradient (used when the bundle has no gallery)
  const cv = document.createElement("canvas");
  cv.width = cv.height = 128;
  const g = cv.getContext("2d");
  const grad = g.createLinearGradient(0, 0, 128, 128);
  grad.addColorStop(0, "#20304a"); grad.addColorStop(1, "#8aa2c8");
  g.fillStyle = grad; g.fillRect(0, 0, 128, 128);
  g.fillStyle = "#f2c14e"; g.beginPath(); g.arc(40, 44, 22, 0, Math.PI * 2); g.fill();
  g.fillStyle = "#e4572e"; g.fillRect(70, 62, 44, 40);
  g.fillStyle = "#f5f5f5"; g.fillRect(18, 88, 36, 20);
  return new Promise((resolve) => cv.toBlob(resolve, "image/png"));
}

async function loadGallery() {
  if (state.gallery !== null) return state.gallery;
  try {
    state.gallery = (await (await call("/demo/gallery")).json()).images;
  } catch (_) {
    state.gallery = [];
  }
  return state.gallery;
}

async function fetchBlob(path, options) {
  const r = await call(path, options);
  r._blob = await r.blob();
  return r;
}

async function reconstruct(blob) {
  if ($("panel-reconstruct").dataset.state === "off") return;
  setPanel("reconstruct", "busy", "");
  const ratio = Number($("ratio").value), seed = $("seed").value || "0";
  try {
    const r = await fetchBlob(`/reconstruct?mask_ratio=${ratio}&seed=${seed}`,
                              { method: "POST", body: blob, headers: { "Content-Type": "application/octet-stream" } });
    await showImage($("reconstruct-img"), r._blob);
    setPanel("reconstruct", "done",
             `${r.headers.get("X-Masked-Count")} patches masked (ratio ${Number(r.headers.get("X-Mask-Ratio")).toFixed(2)}), seed ${r.headers.get("X-Seed")}`);
  } catch (e) { setPanel("reconstruct", "error", e.message); }
}

function showImage(img, blobOrUrl) {
  return new Promise((resolve) => {
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = typeof blobOrUrl === "string" ? blobOrUrl : URL.createObjectURL(blobOrUrl);
  });
}

async function segment(blob) {
  if ($("panel-segment").dataset.state === "off") return;
  setPanel("segment", "busy", "");
  try {
    const body = await (await call("/segment?overlay=true&overlay_alpha=0.6",
      { method: "POST", body: blob, headers: { "Content-Type": "application/octet-stream" } })).json();
    const res = body.results[0];
    await showImage($("segment-img"), `data:image/png;base64,${res.overlay}`);
    const legend = $("segment-legend");
    legend.textContent = "";
    for (const c of res.class_pixels) {
      if (c.id === 0 || c.fraction <= 0) continue;
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.style.background = `rgb(${body.palette[c.id].join(",")})`;
      li.append(sw, `${c.name} ${(100 * c.fraction).toFixed(1)}%`);
      legend.append(li);
    }
    setPanel("segment", "done", `${res.width}×${res.height} label map, ${body.classes.length} classes`);
  } catch (e) { setPanel("segment", "error", e.message); }
}

async function detect(blob, bitmap) {
  if ($("panel-detect").dataset.state === "off") return;
  setPanel("detect", "busy", "");
  try {
    const body = await (await call("/detect",
      { method: "POST", body: blob, headers: { "Content-Type": "application/octet-stream" } })).json();
    const res = body.results[0];
    const cv = $("detect-canvas");
    const scale = Math.min(1, 512 / Math.max(res.width, res.height)) * Math.max(1, 256 / Math.max(res.width, res.height));
    cv.width = Math.round(res.width * scale); cv.height = Math.round(res.height * scale);
    const g = cv.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(bitmap, 0, 0, cv.width, cv.height);
    g.lineWidth = 2; g.font = "12px sans-serif";
    const list = $("detect-list");
    list.textContent = "";
    res.detections.forEach((d, i) => {
      const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
      const hue = (i * 67) % 360;
      g.strokeStyle = `hsl(${hue} 90% 55%)`; g.strokeRect(x1, y1, x2 - x1, y2 - y1);
      g.fillStyle = g.strokeStyle; g.fillText(`${d.label_name} ${d.score.toFixed(2)}`, x1 + 2, Math.max(11, y1 - 3));
      const li = document.createElement("li");
      li.textContent = `${d.label_name} ${d.score.toFixed(2)} [${d.box.map((v) => v.toFixed(0)).join(", ")}]`;
      list.append(li);
    });
    setPanel("detect", "done", `${res.detections.length} detections at score ≥ ${body.score_threshold}`);
  } catch (e) { setPanel("detect", "error", e.message); }
}

async function embedBlobs(blobs) {
  const form = new FormData();
  blobs.forEach((b, i) => form.append("files", b, `image${i}`));
  const body = await (await call("/embed?normalize=true", { method: "POST", body: form })).json();
  return body.embeddings;
}

async function neighbours(blob) {
  if ($("panel-neighbours").dataset.state === "off") return;
  setPanel("neighbours", "busy", "");
  const grid = $("neighbours");
  grid.textContent = "";
  try {
    const names = await loadGallery();
    if (!names.length) { setPanel("neighbours", "empty", "this bundle carries no gallery (images in BUNDLE/gallery/)"); return; }
    if (!state.galleryVectors) {
      const per = state.card.limits.max_images_per_request;
      const blobs = await Promise.all(names.map(async (n) => (await fetchBlob(`/demo/gallery/${encodeURIComponent(n)}`))._blob));
      state.galleryBlobs = blobs;
      const vectors = [];
      for (let i = 0; i < blobs.length; i += per) vectors.push(...await embedBlobs(blobs.slice(i, i + per)));
      state.galleryVectors = vectors;
    }
    const [q] = await embedBlobs([blob]);
    const scored = state.galleryVectors.map((v, i) => [v.reduce((s, x, j) => s + x * q[j], 0), i]);
    scored.sort((a, b) => b[0] - a[0]);
    for (const [score, i] of scored.slice(0, 8)) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = names[i];
      await showImage(img, state.galleryBlobs[i]);
      const cap = document.createElement("figcaption");
      cap.textContent = `${names[i]} ${Number.isFinite(score) ? score.toFixed(3) : "–"}`;
      fig.append(img, cap);
      grid.append(fig);
    }
    setPanel("neighbours", "done", `top ${Math.min(8, scored.length)} of ${names.length} gallery images`);
  } catch (e) { setPanel("neighbours", "error", e.message); }
}

function markRects() {
  // where each result landed on the page (tests crop their screenshot with these)
  for (const [panel, id] of [["reconstruct", "reconstruct-img"], ["segment", "segment-img"],
                             ["detect", "detect-canvas"], ["neighbours", "neighbours"]]) {
    const r = $(id).getBoundingClientRect();
    $(`panel-${panel}`).dataset.rect = [r.left, r.top, r.width, r.height].map(Math.round).join(",");
  }
}

async function run(blob) {
  state.image = blob;
  const run = ++state.runs;
  status("Running...");
  let bitmap;
  try { bitmap = await createImageBitmap(blob); } catch (_) { bitmap = null; }
  await Promise.all([reconstruct(blob), segment(blob), bitmap ? detect(blob, bitmap) : Promise.resolve(), neighbours(blob)]);
  if (run !== state.runs) return;
  const failed = [...document.querySelectorAll(".panel[data-state=error]")].map((p) => p.querySelector("h2").textContent);
  status(failed.length ? `Done, with errors in: ${failed.join(", ")}` : "Done.");
  markRects();
  document.body.dataset.done = String(run);
}

async function sample() {
  const names = await loadGallery();
  if (names.length) return (await fetchBlob(`/demo/gallery/${encodeURIComponent(names[0])}`))._blob;
  return sampleImage();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) run(e.target.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) run(e.dataTransfer.files[0]);
  });
  $("ratio").addEventListener("input", () => { $("ratio-value").textContent = Number($("ratio").value).toFixed(2); });
  $("ratio").addEventListener("change", () => { if (state.image) reconstruct(state.image).then(markRects); });
  $("seed").addEventListener("change", () => { if (state.image) reconstruct(state.image).then(markRects); });
  $("sample").addEventListener("click", async () => run(await sample()));
  $("key").value = localStorage.getItem("cae-key") || "";
  $("key").addEventListener("change", async () => {
    localStorage.setItem("cae-key", $("key").value.trim());
    state.gallery = null; state.galleryVectors = null;
    if (await loadModel()) status(state.image ? "Key saved." : "Pick an image to start.");
  });
}

async function main() {
  wire();
  const params = new URLSearchParams(location.search);
  if (params.has("mask_ratio")) { $("ratio").value = params.get("mask_ratio"); $("ratio").dispatchEvent(new Event("input")); }
  if (params.has("key")) $("key").value = params.get("key");
  if (!(await loadModel())) return;
  if (params.has("example")) run(await sample());  // ?example: run on the sample at once (demos, tests)
}

main();
