// tinycifar serve: the page. Plain JavaScript, no libraries; everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, view: "test", offset: 0, limit: 48, total: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

class RequestError extends Error {
  constructor(status, body) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    super(`${status}: ${detail}`);
    this.body = body;
  }
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new RequestError(response.status, body);
  return body;
}

const query = (extra = {}) => new URLSearchParams({ model: state.model, ...extra }).toString();

// ------------------------------------------------------------------ predictions

function bars(top) {
  return el("div", { class: "bars" }, ...top.map((t) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * t.prob).toFixed(1)}%`;
    return el("div", { class: "bar" }, el("span", {}, t.label), el("div", { class: "track" }, fill),
      el("span", { class: "p" }, `${(100 * t.prob).toFixed(1)}%`));
  }));
}

function showResult(r) {
  const shot = el("div", { class: "shot" },
    el("img", { class: "input", alt: `${r.filename} as the network sees it`, src: `data:image/png;base64,${r.input_png}` }));
  if (r.gradcam_png) {
    const cam = el("img", { class: "cam", alt: "Grad-CAM overlay", src: `data:image/png;base64,${r.gradcam_png}` });
    cam.style.opacity = $("opacity").value / 100;
    shot.append(cam);
  }
  const best = r.top[0];
  const verdict = el("p", { class: "verdict" }, el("span", {
    class: r.true_label ? (r.true_label === best.label ? "right" : "wrong") : "" }, best.label));
  if (r.true_label) verdict.append(el("span", { class: "truth" }, `  true: ${r.true_label}`));
  const card = el("article", { class: "result" }, shot,
    el("div", {}, el("h3", {}, r.filename), verdict, bars(r.top)));
  $("results").prepend(card);
}

function showErrors(errors) {
  for (const e of errors) $("results").prepend(el("article", { class: "result error" }, e.error));
}

async function predictFiles(files) {
  const images = [...files].filter((f) => f.size > 0 || f.type);
  if (!images.length) return;
  const form = new FormData();
  for (const f of images) form.append("file", f, f.name || "pasted image");
  status(`classifying ${images.length} image${images.length > 1 ? "s" : ""}...`);
  try {
    const body = await getJSON(`/api/predict?${query({ top_k: 5, gradcam: 1 })}`, { method: "POST", body: form });
    body.results.forEach(showResult);
    showErrors(body.errors || []);
    status(body.errors && body.errors.length ? `${body.errors.length} file(s) could not be read` : "", !!(body.errors && body.errors.length));
  } catch (err) {
    showErrors((err.body && err.body.errors) || []);  // every file unusable: each is named
    status(err.message, true);
  }
}

async function predictTest(index) {
  status(`classifying test image #${index}...`);
  try {
    const body = await getJSON(`/api/predict-test?${query({ index, top_k: 5, gradcam: 1 })}`, { method: "POST" });
    body.results.forEach(showResult);
    status("");
    $("try").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (err) {
    status(err.message, true);
  }
}

// ------------------------------------------------------------------ gallery

async function loadGallery() {
  const gallery = $("gallery");
  gallery.replaceChildren();
  try {
    const body = await getJSON(`/api/gallery?${query({ view: state.view, offset: state.offset, limit: state.limit })}`);
    state.total = body.total;
    $("gallery-note").textContent = state.view === "mistakes"
      ? `${body.total.toLocaleString()} test images this network gets wrong, the most confident mistakes first. Click one for its Grad-CAM.`
      : `${body.total.toLocaleString()} test images with their true labels. Click one to classify it.`;
    for (const item of body.items) {
      const miss = item.predicted !== item.label;
      const caption = state.view === "mistakes" ? `${item.label} → ${item.predicted}` : item.label;
      const button = el("button", { class: `thumb${miss ? " miss" : ""}`, title: `#${item.index}: true ${item.label}, predicted ${item.predicted} (${(100 * item.prob).toFixed(0)}%)` },
        el("img", { alt: `test image ${item.index}, a ${item.label}`, src: `data:image/png;base64,${item.png}` }),
        el("span", {}, caption));
      button.addEventListener("click", () => predictTest(item.index));
      gallery.append(button);
    }
    const page = Math.floor(state.offset / state.limit) + 1, pages = Math.max(1, Math.ceil(state.total / state.limit));
    $("page").textContent = `page ${page} of ${pages}`;
    $("prev").disabled = state.offset === 0;
    $("next").disabled = state.offset + state.limit >= state.total;
  } catch (err) {
    $("gallery-note").textContent = `No test images: ${err.message}`;
    $("page").textContent = "";
  }
}

function setView(view) {
  state.view = view;
  state.offset = 0;
  $("tab-test").setAttribute("aria-selected", view === "test");
  $("tab-mistakes").setAttribute("aria-selected", view === "mistakes");
  loadGallery();
}

// ------------------------------------------------------------------ model card

function curves(history) {
  const width = 420, height = 170, pad = 28;
  const points = history.filter((h) => h.test_acc != null);
  if (points.length < 2) return el("p", { class: "hint" }, points.length ? "one epoch: no curve to draw" : "no training history in the run folder");
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("id", "curves");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "test and train accuracy per epoch");
  const epochs = points.map((h) => h.epoch), last = Math.max(...epochs);
  const x = (e) => pad + (width - 2 * pad) * (e - 1) / Math.max(last - 1, 1);
  const y = (a) => height - pad - (height - 2 * pad) * a / 100;
  const line = (key, colour) => {
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", points.filter((h) => h[key] != null).map((h) => `${x(h.epoch)},${y(h[key])}`).join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", colour);
    path.setAttribute("stroke-width", "2");
    svg.append(path);
  };
  for (const a of [0, 25, 50, 75, 100]) {
    const grid = document.createElementNS(ns, "line");
    Object.entries({ x1: pad, x2: width - pad, y1: y(a), y2: y(a), stroke: "#e3e7ee" }).forEach(([k, v]) => grid.setAttribute(k, v));
    const label = document.createElementNS(ns, "text");
    Object.entries({ x: 2, y: y(a) + 4, "font-size": 10, fill: "#5b6475" }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = `${a}%`;
    svg.append(grid, label);
  }
  line("train_acc", "#9aa9c4");
  line("test_acc", "#2f6fde");
  const axis = document.createElementNS(ns, "text");
  Object.entries({ x: width / 2, y: height - 6, "font-size": 10, fill: "#5b6475", "text-anchor": "middle" }).forEach(([k, v]) => axis.setAttribute(k, v));
  axis.textContent = `epoch 1 to ${last}`;
  svg.append(axis);
  return el("div", {}, svg, el("p", { class: "legend" }, "accuracy per epoch: test (blue), train on augmented batches (grey)"));
}

async function loadCard() {
  const card = await getJSON(`/api/model?${query()}`);
  // an image-folder run's gallery holds its own test images and classes, not CIFAR-10's
  document.getElementById("browse-title").textContent =
    card.dataset === "folder" ? `Test images (${card.classes.join(", ")})` : "CIFAR-10 test images";
  const rows = [
    ["network", card.network], ["parameters", card.params.toLocaleString()],
    ["multiply-accumulates", `${(card.macs / 1e6).toFixed(1)}M per image`], ["receptive field", `${card.receptive_field} pixels`],
    ["test accuracy", card.test_accuracy == null ? "unknown (no test set)" : `${card.test_accuracy.toFixed(2)}%`],
    ["checkpoint", `${card.checkpoint} (epoch ${card.epoch})`], ["engine", card.engine], ["Grad-CAM layer", card.gradcam_layer],
  ];
  const table = el("table", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v)))));
  const parts = [table];
  if (card.per_class_accuracy) {
    parts.push(el("h3", {}, "Per-class test accuracy"), el("div", { class: "bars" }, ...Object.entries(card.per_class_accuracy).map(([c, a]) =>
      bars([{ label: c, prob: a / 100 }]).firstChild)));
  }
  parts.push(el("h3", {}, "Training"), curves(card.history));
  $("card-body").replaceChildren(...parts);
}

// ------------------------------------------------------------------ wiring

async function selectModel(name) {
  state.model = name;
  state.offset = 0;
  $("results").replaceChildren();
  await Promise.all([loadCard(), loadGallery()]);
}

async function start() {
  const drop = $("drop"), input = $("files");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { predictFiles(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); predictFiles(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => {
    const files = [...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) predictFiles(files);
  });
  $("opacity").addEventListener("input", () => {
    document.querySelectorAll(".shot img.cam").forEach((img) => { img.style.opacity = $("opacity").value / 100; });
  });
  $("tab-test").addEventListener("click", () => setView("test"));
  $("tab-mistakes").addEventListener("click", () => setView("mistakes"));
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadGallery(); });
  $("next").addEventListener("click", () => { state.offset += state.limit; loadGallery(); });
  const models = await getJSON("/api/models");
  const select = $("model");
  for (const m of models) {
    const acc = m.test_accuracy == null ? "" : ` (${m.test_accuracy.toFixed(2)}%)`;
    select.append(el("option", { value: m.name }, `${m.name}: ${m.network}${acc}`));
  }
  select.addEventListener("change", () => selectModel(select.value));
  await selectModel(models[0].name);
  document.body.dataset.ready = "1";
}

start().catch((err) => status(err.message, true));
