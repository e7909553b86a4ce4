"""Results pages: ``report.html`` for a finished run, ``index.html`` for a batch of runs.

Each page is one self-contained file that works offline: images are data URIs, the mesh is a
base64 GLB shown by a three.js viewer inlined into the page (Chromium refuses module scripts and
fetch() on file:// pages), and the curves are inline SVG drawn by matplotlib. Opening a page
makes no request that leaves the machine. The vendored files and their licences: gen3d/web/.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .io import write_text

WEB = Path(__file__).parent / "web"
VIEWER_BYTES = 3 << 20  # a GLB up to this size goes into the page as it is ...
VIEWER_FACES = 80_000  # ... a bigger one is reduced to at most this many faces, so the page opens in < 3 s
THUMBNAIL = 192  # index.html's thumbnails, in pixels
# The metrics the index shows for each run, when any run has them.
KEY_METRICS = ("psnr_test", "ssim_test", "chamfer", "reference_psnr", "reference_mask_iou", "final_loss",
               "steps", "train_seconds")
PREVIEWS = (("turntable.gif", "the result turning"),
            ("test_views.png", "held-out views, predicted (top) against real (bottom)"),
            ("reference.png", "the reference image as given (left) beside the result from its camera (right)"),
            ("cutout.png", "the cut-out the run was given"),
            ("overview.png", "what preprocessing found in the photo"), ("rgba.png", "the cut-out it made"),
            ("views.png", "a scene's views as they were made (top), the inpainted pixels tinted (bottom)"))
STATE_ORDER = {"failed": 0, "running": 1, "queued": 2, "done": 3}
LABELS = {"seconds": "wall seconds"}  # batch.json's own figure for a run: its whole time, not only training


# --- report.html ---------------------------------------------------------------------------------

def write_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from what the run folder holds; returns its path."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    recipe = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else ""
    sections = [_viewer_section(run_dir), _previews_section(run_dir),
                _curves_section(run_dir, metrics), _metrics_section(metrics),
                _section("Resolved recipe", f"<pre>{html.escape(recipe)}</pre>") if recipe else ""]
    head = f"<h1>{html.escape(run_dir.name)}</h1><p class=summary>{html.escape(_summary(metrics))}</p>{_files(run_dir)}"
    path = run_dir / "report.html"
    write_text(path, _page(f"gen3d run {run_dir.name}", head + "".join(sections)))
    return path


def _summary(metrics: dict) -> str:
    shown = [f"{k} {_fmt(metrics[k])}" for k in KEY_METRICS if _is_number(metrics.get(k))]
    if "prompt" in metrics:
        shown.insert(0, f"prompt {metrics['prompt']!r}")
    return " · ".join(shown) or "no metrics.json: the run has not finished"


def _files(run_dir: Path) -> str:
    # Plain links: a link is no request until it is followed.
    names = [p.name for p in sorted(run_dir.iterdir()) if p.suffix in (".glb", ".obj", ".ply", ".gif", ".png", ".json",
                                                                          ".mp4")
             and p.is_file() and not p.name.startswith(".")]
    return "<p class=files>" + " ".join(f'<a href="{quote(n)}">{html.escape(n)}</a>' for n in names) + "</p>"


def _viewer_section(run_dir: Path) -> str:
    glb = run_dir / "mesh.glb"
    if not glb.is_file():
        return ""
    try:
        data, note = viewer_glb(glb)
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
        return _section("Mesh", f"<p class=note>The viewer cannot show mesh.glb: {html.escape(str(exc))}</p>")
    script = (WEB / "viewer.js").read_text()
    mesh = base64.b64encode(data).decode()
    body = (f'<canvas id=viewer data-state=loading></canvas>'
            f'<p class=note><label><input type=checkbox id=lit> lit</label> · drag to turn, scroll to zoom, '
            f'right-drag to pan. {html.escape(note)}</p>'
            f'<script>{script}</script>'
            f'<script>const view = gen3dViewer.show(document.getElementById("viewer"), "{mesh}");'
            f'document.getElementById("lit").onchange = (e) => view && view.setLit(e.target.checked);</script>')
    return _section("Mesh", body)


def viewer_glb(path: Path) -> tuple[bytes, str]:
    """The GLB the page shows, and a note when it is not the file itself: a mesh too big to open
    quickly in a browser is reduced by vertex clustering (for the page only)."""
    data = path.read_bytes()
    if len(data) <= VIEWER_BYTES:
        return data, ""
    import trimesh

    vertices, read_faces, colors = read_glb(data)
    vertices, faces, colors = reduce_mesh(vertices, read_faces, colors, VIEWER_FACES)
    # trimesh writes COLOR_0 in 8 bits: the same linear values, coarser in the darks; fine for a preview.
    small = trimesh.Trimesh(vertices, faces, vertex_colors=(np.clip(colors, 0, 1) * 255 + 0.5).astype(np.uint8),
                            process=False)
    note = f"Shown reduced to {len(small.faces):,} faces; mesh.glb has {len(read_faces):,}."
    return small.export(file_type="glb"), note


GLB_TYPES = {5120: "i1", 5121: "u1", 5122: "<i2", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
GLB_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def read_glb(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every triangle primitive of a GLB (node transforms ignored; gen3d's exporters write none):
    positions [N, 3], faces [F, 3] and linear RGBA colours [N, 4] in 0..1 (white without COLOR_0).
    Read here because trimesh drops 16-bit COLOR_0 when the mesh has a material."""
    magic, _, length = struct.unpack_from("<III", data)
    if magic != 0x46546C67:
        raise ValueError("not a GLB file")
    gltf, binary, offset = {}, b"", 12
    while offset < length:
        size, kind = struct.unpack_from("<II", data, offset)
        chunk = data[offset + 8:offset + 8 + size]
        if kind == 0x4E4F534A:  # "JSON"
            gltf = json.loads(chunk)
        elif kind == 0x004E4942:  # "BIN"
            binary = chunk
        offset += 8 + size

    def accessor(index: int) -> np.ndarray:
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        dtype, width = np.dtype(GLB_TYPES[acc["componentType"]]), GLB_WIDTHS[acc["type"]]
        values = np.ndarray((acc["count"], width), dtype, binary, view.get("byteOffset", 0) + acc.get("byteOffset", 0),
                            (view.get("byteStride") or dtype.itemsize * width, dtype.itemsize))
        return values / np.iinfo(dtype).max if acc.get("normalized") else values.astype(np.float64)

    vertices, faces, colors, count = [], [], [], 0
    for mesh in gltf.get("meshes", []):
        for primitive in mesh["primitives"]:
            if primitive.get("mode", 4) != 4:  # triangles only
                continue
            attributes = primitive["attributes"]
            v = accessor(attributes["POSITION"])
            f = (accessor(primitive["indices"]).astype(np.int64).reshape(-1, 3) if "indices" in primitive
                 else np.arange(len(v)).reshape(-1, 3))
            c = accessor(attributes["COLOR_0"]) if "COLOR_0" in attributes else np.ones((len(v), 4))
            vertices.append(v)
            faces.append(f + count)
            colors.append(np.hstack([c, np.ones((len(c), 1))]) if c.shape[1] == 3 else c)
            count += len(v)
    if not vertices:
        raise ValueError("the GLB holds no triangles")
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(colors)


def reduce_mesh(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
                max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most ``max_faces`` faces by vertex clustering: the vertices in one cell of a grid merge
    into their mean (colours too), faces that collapse are dropped. Coarser cells until it fits."""
    low = vertices.min(0)
    edge = float(np.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]], axis=1).mean()) or 1.0
    # Faces of a surface grow with the square of the cells per side: start at the cell that should fit.
    cell = edge * math.sqrt(len(faces) / max_faces)
    while True:
        keys = np.floor((vertices - low) / cell).astype(np.int64)
        _, inverse = np.unique(keys[:, 0] * (1 << 40) + keys[:, 1] * (1 << 20) + keys[:, 2], return_inverse=True)
        inverse = inverse.reshape(-1)
        kept = inverse[faces]
        kept = kept[(kept[:, 0] != kept[:, 1]) & (kept[:, 1] != kept[:, 2]) & (kept[:, 0] != kept[:, 2])]
        _, first = np.unique(np.sort(kept, axis=1), axis=0, return_index=True)
        kept = kept[np.sort(first)]  # one of each face, its winding kept
        if len(kept) <= max_faces:
            break
        cell *= 1.25
    count = np.bincount(inverse)[:, None]

    def mean(values: np.ndarray) -> np.ndarray:  # per cell
        return np.stack([np.bincount(inverse, values[:, k]) for k in range(values.shape[1])], 1) / count

    return mean(vertices), kept, mean(colors)


def _previews_section(run_dir: Path) -> str:
    figures = [_figure(run_dir / name, caption) for name, caption in PREVIEWS if (run_dir / name).is_file()]
    return _section("Previews", f"<div class=previews>{''.join(figures)}</div>") if figures else ""


def _figure(path: Path, caption: str) -> str:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    scale = max(1, min(3, 300 // height))  # small previews shown 2-3x, pixel for pixel
    sharp = " class=pixelated" if scale > 1 else ""  # a wide one (a scene's views) is shrunk smoothly
    return (f'<figure><img{sharp} width={width * scale} src="{_data_uri(path)}" alt="{path.name}">'
            f"<figcaption>{path.name}: {html.escape(caption)}</figcaption></figure>")


# --- curves ----------------------------------------------------------------------------------------

def stage_curves(run_dir: Path, metrics: dict) -> list[dict[str, Any]]:
    """Each training stage's curves: ``name``, ``points`` (curves.json: per-window means of what the
    steps report), ``timeline`` (the evaluations at eval_at_seconds), and its steps and seconds."""
    if isinstance(metrics.get("stages"), dict):
        stages = [(name, run_dir / "stages" / name, m) for name, m in metrics["stages"].items()]
    else:
        stages = [("", run_dir, metrics)]
    found = []
    for name, folder, m in stages:
        points = _read_json(folder / "curves.json").get("points", [])
        if points or m.get("timeline"):
            found.append({"name": name, "points": points, "timeline": m.get("timeline", []),
                          "steps": m.get("steps", 0), "seconds": m.get("train_seconds", 0.0)})
    return found


def _curves_section(run_dir: Path, metrics: dict) -> str:
    stages = stage_curves(run_dir, metrics)
    if not stages:  # a run that does not train has no curve to miss
        missing = "<p class=note>This run recorded no curves (no curves.json).</p>"
        return _section("Training curves", missing) if "steps" in metrics else ""
    return _section("Training curves", f"<div class=curves>{curves_svg(stages)}</div>")


def curves_svg(stages: list[dict[str, Any]]) -> str:
    """Loss (and PSNR, where any was recorded) over steps and over training seconds, one colour a
    stage, later stages continuing where the earlier ones ended; an inline SVG."""
    import matplotlib
    from matplotlib.figure import Figure

    has_psnr = any(_psnr_keys(s) for s in stages)
    fig = Figure(figsize=(10, 6.4 if has_psnr else 3.4))
    # Fixed margins and legend places: matplotlib's layout engines and loc="best" cost seconds.
    fig.subplots_adjust(left=0.085, right=0.985, top=0.97, bottom=0.09 if has_psnr else 0.16, hspace=0.3, wspace=0.25)
    axes = fig.subplots(2 if has_psnr else 1, 2, squeeze=False)
    offset = {"step": 0, "seconds": 0.0}
    for i, stage in enumerate(stages):
        color, label = f"C{i}", stage["name"] or "training"
        for col, x in enumerate(("step", "seconds")):
            points = [p for p in stage["points"] if _is_number(p.get("loss"))]
            axes[0][col].plot([p[x] + offset[x] for p in points], [p["loss"] for p in points], color=color,
                              lw=1.2, label=f"{label}: loss")
            if has_psnr:
                _plot_psnr(axes[1][col], stage, x, offset[x], color, label)
            if i:
                for row in axes:
                    row[col].axvline(offset[x], color="0.6", lw=0.8, ls=":")
        offset = {"step": offset["step"] + stage["steps"], "seconds": offset["seconds"] + stage["seconds"]}
    for r, row in enumerate(axes):
        for col, x in enumerate(("step", "seconds")):
            row[col].set_xlabel("step" if x == "step" else "training seconds")
            row[col].grid(alpha=0.3)
            if row[col].has_data():
                row[col].legend(fontsize=8, loc="lower right" if r else "upper right")
    for ax in axes[0]:
        ax.set_ylabel("loss")
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()) and ax.get_lines():
            ax.set_yscale("log")  # losses fall by decades
    if has_psnr:
        for ax in axes[1]:
            ax.set_ylabel("PSNR")
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, in the page's own fonts: no font files
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _psnr_keys(stage: dict) -> list[tuple[str, str]]:
    """(source, key) pairs of the PSNR series a stage has: from its steps and from its evaluations."""
    keys = {("points", k) for p in stage["points"] for k in p if "psnr" in k}
    keys |= {("timeline", k) for p in stage["timeline"] for k in p if "psnr" in k}
    return sorted(keys)


def _plot_psnr(ax, stage: dict, x: str, offset: float, color: str, label: str) -> None:
    for source, key in _psnr_keys(stage):
        points = [p for p in stage[source] if _is_number(p.get(key))]
        xs, ys = [p[x] + offset for p in points], [p[key] for p in points]
        if source == "points":  # the training batch's PSNR: noisy, so thin
            ax.plot(xs, ys, color=color, lw=0.8, alpha=0.6, label=f"{label}: {key} (training rays)")
        else:  # the quick held-out evaluations
            ax.plot(xs, ys, color=color, lw=1.5, marker="o", ms=3, label=f"{label}: {key} (evaluations)")


# --- metrics --------------------------------------------------------------------------------------

def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return ""
    stages = metrics.get("stages") if isinstance(metrics.get("stages"), dict) else {}
    tables = [_table({k: v for k, v in metrics.items() if k != "stages"})]
    tables += [f"<h3>stage {html.escape(name)}</h3>{_table(m)}" for name, m in stages.items()]
    return _section("metrics.json", "".join(tables))


def _table(metrics: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in metrics.items())
    return f"<table class=metrics>{rows}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)) and len(text := json.dumps(value)) <= 80:
        return f"<code>{html.escape(text)}</code>"
    if isinstance(value, (dict, list)):  # timelines and the like: folded
        return (f"<details><summary>{len(value)} {'entries' if isinstance(value, list) else 'keys'}</summary>"
                f"<pre>{html.escape(json.dumps(value, indent=1))}</pre></details>")
    return html.escape(_fmt(value))


# --- index.html -----------------------------------------------------------------------------------

def write_index(out_dir: Path, manifest: dict) -> Path:
    """Write ``out_dir/index.html`` for a batch (``manifest``: the content of batch.json): a card
    per run with its thumbnail, inputs, key metrics and state, sortable, linked to its report."""
    out_dir = Path(out_dir)
    runs = manifest.get("runs", [])
    columns = [k for k in KEY_METRICS if any(_is_number((r.get("metrics") or {}).get(k)) for r in runs)]
    if any(_is_number(r.get("seconds")) for r in runs):
        columns.append("seconds")
    states = Counter(str(run.get("state", "queued")) for run in runs)
    common = _common_overrides(runs)
    options = "".join(f"<option value='{k}'>{LABELS.get(k, k)}</option>" for k in ["name", "state", *columns])
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    head = (f"<h1>Batch: {html.escape(str(manifest.get('recipe', '')))}</h1>"
            f"<p class=summary>{len(runs)} runs ({html.escape(counts)})"
            f" · engine {html.escape(str(manifest.get('engine', 'local')))}</p>"
            f"<p class=inputs>{'every run: ' + _codes(common) if common else ''}</p>"
            f"<p class=controls>sort by <select id=sort-key>{options}</select> "
            f"<button id=sort-order type=button>ascending</button></p>")
    cards = "".join(_card(out_dir, run, columns, common) for run in runs)
    script = (WEB / "sort.js").read_text()
    path = out_dir / "index.html"
    write_text(path, _page(f"gen3d batch {manifest.get('recipe', '')}",
                           f"{head}<div id=cards>{cards}</div><script>{script}</script>"))
    return path


def _common_overrides(runs: list[dict]) -> list[str]:
    """The overrides every run shares: said once above the cards, so each card shows what is its own."""
    if len(runs) < 2:
        return []
    return [o for o in runs[0].get("overrides") or [] if all(o in (r.get("overrides") or []) for r in runs)]


def _card(out_dir: Path, run: dict, columns: list[str], common: list[str]) -> str:
    folder = out_dir / run.get("folder", run.get("name", ""))
    state = str(run.get("state", "queued"))
    metrics = run.get("metrics") or {}
    values = {**{k: metrics.get(k) for k in columns}, "seconds": run.get("seconds")}
    sort = {"name": run.get("name", ""), "state": STATE_ORDER.get(state, 9),
            **{k: values[k] for k in columns if _is_number(values.get(k))}}
    thumb = _thumbnail(folder)
    picture = (f'<img src="{thumb}" alt="{html.escape(run.get("name", ""))}">' if thumb
               else f"<div class=placeholder>{html.escape(state)}</div>")
    report = folder / "report.html"
    if report.is_file():
        picture = f'<a href="{quote(run.get("folder", run.get("name", "")))}/report.html">{picture}</a>'
    inputs = _codes([o for o in run.get("overrides") or [] if o not in common])
    shown = "".join(f"<dt>{LABELS.get(k, k)}</dt><dd>{html.escape(_fmt(values[k]))}</dd>"
                    for k in columns if _is_number(values.get(k)))
    error = f"<p class=error>{html.escape(str(run['error']))}</p>" if run.get("error") else ""
    return (f"<article class='card {html.escape(state)}' data-sort='{html.escape(json.dumps(sort))}'>{picture}"
            f"<h2>{html.escape(run.get('name', ''))} <span class=state>{html.escape(state)}</span></h2>"
            f"<p class=inputs>{inputs}</p><dl>{shown}</dl>{error}</article>")


def _codes(items: list) -> str:
    return " ".join(f"<code>{html.escape(str(item))}</code>" for item in items)


def _thumbnail(folder: Path) -> str | None:
    """The turntable's first frame (or the reference sheet, or the held-out views), small, as a data URI."""
    from PIL import Image

    for name in ("turntable.gif", "reference.png", "test_views.png", "cutout.png", "views/000.png"):
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                image.seek(0)
                frame = image.convert("RGBA")
            frame.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            frame.save(buffer, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return None


# --- shared ---------------------------------------------------------------------------------------

def _page(title: str, body: str) -> str:
    # The Content-Security-Policy is the promise in the browser's own words: nothing but this file,
    # data: and blob: URLs may be loaded, so the page works (and stays private) offline.
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data: blob:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src data: blob:\">"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{(WEB / 'style.css').read_text()}</style></head><body>{body}</body></html>\n")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _data_uri(path: Path) -> str:
    mime = {".gif": "image/gif", ".png": "image/png", ".jpg": "image/jpeg"}.get(path.suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
