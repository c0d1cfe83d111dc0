"""The page at ``/``: drop or pick a photo; see it, the top-5 labels with probability bars, and each stage's
feature map as a heatmap over the photo. One self-contained HTML document (no external assets: works offline).

Also the API docs at ``/docs``: Swagger UI with its assets served from the ``swagger-ui-bundle`` package, not a
CDN, so the docs work on an air-gapped host too."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from pvt_deploy.serve.service import ServiceDep

DOCS_ASSETS = "/docs/assets"
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pvt-deploy: __MODEL__</title>
<style>
  :root { --ink: #1d2430; --muted: #647085; --accent: #2f7d5b; --bar: #d9efe4; --line: #dde3ea; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
         background: #f6f8fa; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); display: flex;
           align-items: baseline; gap: 14px; }
  header h1 { font-size: 18px; margin: 0; }
  header .untrained { color: #8a5a00; background: #fff4d6; border-radius: 4px; padding: 1px 8px; font-size: 13px; }
  header .model { color: var(--muted); font-family: ui-monospace, monospace; font-size: 13px; }
  main { max-width: 1100px; margin: 0 auto; padding: 20px 24px; }
  #drop { display: block; border: 2px dashed #9fb3c8; border-radius: 10px; background: #fff; padding: 22px;
          text-align: center; color: var(--muted); cursor: pointer; }
  #drop.over { border-color: var(--accent); background: #eef8f3; }
  #drop strong { color: var(--ink); }
  #key-row { margin: 10px 0 0; }
  .grid { display: grid; grid-template-columns: minmax(220px, 340px) 1fr; gap: 22px; margin-top: 20px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px; }
  .card h2 { font-size: 14px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin: 0 0 12px; }
  #photo { width: 100%; border-radius: 6px; display: none; }
  #results { list-style: none; margin: 0; padding: 0; }
  #results li { position: relative; padding: 7px 10px; margin-bottom: 6px; border-radius: 6px; overflow: hidden;
                display: flex; justify-content: space-between; gap: 12px; }
  #results li .fill { position: absolute; inset: 0 auto 0 0; background: var(--bar); z-index: 0; }
  #results li:first-child .fill { background: #bfe3cf; }
  #results li span { position: relative; z-index: 1; }
  #results li .prob { font-variant-numeric: tabular-nums; color: var(--muted); }
  #heatmaps { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin-top: 4px; }
  #heatmaps figure { margin: 0; text-align: center; font-size: 13px; color: var(--muted); }
  #heatmaps canvas { width: 100%; aspect-ratio: 1; border-radius: 6px; border: 1px solid var(--line);
                     image-rendering: auto; }
  #status { margin-top: 12px; min-height: 1.4em; color: var(--muted); }
  #status.error { color: #b3261e; }
  .hint { color: var(--muted); font-size: 13px; }
</style>
</head>
<body>
<header><h1>pvt-deploy</h1><span class="model">__MODEL__</span>__UNTRAINED__</header>
<main>
  <label id="drop" for="file">
    <strong>Drop a photo here</strong> or click to pick one
    <input id="file" type="file" accept="image/*" hidden>
  </label>
  <div id="key-row" __KEY_HIDDEN__>API key: <input id="api-key" type="password" size="32"></div>
  <div id="status" data-state="idle"></div>
  <div class="grid">
    <div class="card"><h2>Photo</h2><img id="photo" alt="the uploaded photo"></div>
    <div class="card"><h2>Top 5</h2><ol id="results"></ol>
      <p class="hint">Top-1: <strong id="top1">-</strong></p></div>
  </div>
  <div class="card" style="margin-top: 22px"><h2>Feature maps (channel energy per stage)</h2>
    <div id="heatmaps"></div></div>
</main>
<script>
"use strict";
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const $ = (id) => document.getElementById(id);

function color(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state;
  status.className = state === "error" ? "error" : "";
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function post(path, file) {
  const form = new FormData();
  form.append("image", file, file.name || "photo");
  const response = await fetch(path, { method: "POST", body: form, headers: headers() });
  const body = await response.json();
  if (!response.ok) {
    const item = body.errors && body.errors[0];
    throw new Error(item ? item.item + ": " + item.reason : (body.detail || response.statusText));
  }
  return body;
}

function showPredictions(predictions) {
  const list = $("results");
  list.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * p.probability).toFixed(1) + "%";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = (100 * p.probability).toFixed(1) + "%";
    li.append(fill, label, prob);
    list.append(li);
  }
  $("top1").textContent = predictions.length ? predictions[0].label : "-";
}

function showHeatmaps(stages, photo) {
  const box = $("heatmaps");
  box.replaceChildren();
  for (const [name, grid] of Object.entries(stages)) {
    const rows = grid.length, cols = grid[0].length;
    const small = document.createElement("canvas");
    small.width = cols; small.height = rows;
    const pixels = small.getContext("2d").createImageData(cols, rows);
    grid.forEach((row, y) => row.forEach((v, x) => {
      const [r, g, b] = color(v), o = 4 * (y * cols + x);
      pixels.data.set([r, g, b, 255], o);
    }));
    small.getContext("2d").putImageData(pixels, 0, 0);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 256;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(photo, 0, 0, 256, 256);
    ctx.globalAlpha = 0.6;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, 256, 256);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = name + " (" + rows + "x" + cols + ")";
    figure.append(canvas, caption);
    box.append(figure);
  }
}

async function run(file) {
  if (!file) return;
  setStatus("Running " + (file.name || "photo") + "...", "busy");
  const photo = $("photo");
  photo.src = URL.createObjectURL(file);
  photo.style.display = "block";
  try {
    const [predicted, features] = await Promise.all([post("v1/predict?top_k=5", file),
                                                     post("v1/features?format=heatmap", file)]);
    if (!photo.complete) await new Promise((ok) => photo.addEventListener("load", ok, { once: true }));
    showPredictions(predicted.results[0].predictions);
    showHeatmaps(features.results[0].stages, photo);
    setStatus("Done: " + (file.name || "photo"), "done");
  } catch (error) {
    setStatus(String(error.message || error), "error");
  }
}

$("file").addEventListener("change", (e) => run(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  run(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""


UNTRAINED_NOTE = '<span class="untrained">random weights: answers are meaningless</span>'


def render_page(model_name: str, *, needs_key: bool, untrained: bool) -> str:
    """The page for this model; the API-key field shows only when the server wants one."""
    return (
        _PAGE.replace("__MODEL__", html.escape(model_name))
        .replace("__KEY_HIDDEN__", "" if needs_key else "hidden")
        .replace("__UNTRAINED__", UNTRAINED_NOTE if untrained else "")
    )


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def page(service: ServiceDep) -> HTMLResponse:
    return HTMLResponse(
        render_page(service.model_name, needs_key=service.api_key is not None, untrained=service.untrained)
    )


@router.get("/docs", response_class=HTMLResponse)
async def api_docs(service: ServiceDep) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"pvt-deploy: {service.model_name}",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_ui_parameters={"validatorUrl": None},  # the default validator badge is fetched from swagger.io
    )


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
async def api_docs_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(DOCS_ASSETS + "/{name}")
async def api_docs_asset(name: str) -> FileResponse:
    if name not in SWAGGER_ASSETS:
        raise HTTPException(404, f"no docs asset {name!r}")
    return FileResponse(_swagger_dir() / name, headers={"Cache-Control": "public, max-age=86400"})


@cache
def _swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))
