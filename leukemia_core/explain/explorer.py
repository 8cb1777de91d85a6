"""The prediction explorer: browse a run's predictions, their images and CAMs.

``load_run`` reads what ``leukemia-core train`` (or ``pipeline.train_classifier``) wrote:
a run folder with ``model.safetensors`` and ``predictions_<split>.csv`` (columns
``relpath, label, pred, confidence, prob_<class>``; ``relpath`` is relative to the
dataset's folder under the data root), or one predictions CSV plus a checkpoint.
:class:`ExplorerData` does the work without any widget (filters, confusion matrix,
thumbnails, cached CAM overlays, the HTML of the image grid); :func:`explorer` wraps it
in ipywidgets (imported lazily: the core imports without Jupyter) with a plotly
``FigureWidget`` confusion matrix whose cells are clickable.

Optional columns, for models written elsewhere in the book, are shown when present:

- ``top_sentences`` (vision-language models): a JSON list of sentences or of
  ``[sentence, score]`` pairs, best first;
- ``boxes`` (detection models): a JSON list of ``{"box": [x0, y0, x1, y1], "label": ...,
  "score": ..., "caption": ...}`` in the original image's pixels, drawn on the thumbnail
  and listed with their captions (``attributes``, a dict, is accepted for ``caption``);
- ``dataset`` and ``split`` (else the checkpoint's dataset and the CSV's file name);
- ``error`` (``predict`` / ``evaluate --images``): rows with an unreadable image are left out.

A folder written by ``leukemia-core evaluate --images DIR --out OUTDIR`` (``predictions.csv``
with absolute ``path``, the folder's class as ``label``, no checkpoint: no CAMs) opens too.

Served as a web app by Voilà (``make explore``; :func:`serve` starts it on 127.0.0.1).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import CheckpointError, DatasetError, LeukemiaError

ALL = "(all)"
UNLABELLED = "(none)"
#: The Voilà app: a two-cell notebook calling :func:`explorer` on ``$LEUKEMIA_EXPLORER_RUN``.
APP = REPO_ROOT / "apps" / "explorer.ipynb"
RUN_ENV = "LEUKEMIA_EXPLORER_RUN"
#: Where tests/test_explorer_browser.py leaves its screenshots (with ``shots.json``), git-ignored;
#: the book's explorer page embeds them when they are there.
SCREENSHOTS = REPO_ROOT / "_build" / "screenshots" / "explorer"


# --------------------------------------------------------------------------- loading
def _split_of(csv: Path) -> str:
    stem = csv.stem
    return stem.split("predictions_", 1)[1] if stem.startswith("predictions_") else "all"


@functools.lru_cache(maxsize=16)
def _dataset_folder(dataset: str, data_root=None) -> Path:
    """The folder a dataset's ``relpath`` values are relative to (its loader lists it once)."""
    from leukemia_core.data import load_dataset
    return Path(load_dataset(dataset, data_root, hashes=False).attrs["root"])


def load_run(run: str | Path, checkpoint: str | Path | None = None, data_root=None,
             dataset: str | None = None, thumb_px: int = 112) -> "ExplorerData":
    """Predictions (and, when there is one, the checkpoint) of a run folder or CSV."""
    run = Path(run)
    if not run.is_absolute() and not run.exists():
        run = REPO_ROOT / run  # `make` and the book work from the repository root
    if run.is_dir():
        # `leukemia-core train` writes predictions_<split>.csv, `evaluate --images` predictions.csv
        csvs = sorted(run.glob("predictions_*.csv")) or sorted(run.glob("predictions.csv"))
        if not csvs:
            raise DatasetError(f"{run} holds no predictions_<split>.csv (or predictions.csv); train a "
                               "model into it (`leukemia-core train --out DIR`), evaluate one into it "
                               "(`leukemia-core evaluate --images IMAGES --out DIR`) or pass a predictions CSV")
        folder = run
    elif run.suffix == ".csv" and run.is_file():
        csvs, folder = [run], run.parent
    else:
        raise DatasetError(f"{run} is neither a run folder nor a predictions CSV")
    if checkpoint is None and (folder / "model.safetensors").exists():
        checkpoint = folder / "model.safetensors"
    model, meta = None, {}
    if checkpoint is not None:
        from leukemia_core.pipeline import load_classifier
        model, meta = load_classifier(checkpoint)
    parts = []
    for csv in csvs:
        try:
            part = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read predictions {csv}: {exc}") from exc
        parts.append(part if "split" in part else part.assign(split=_split_of(csv)))
    table = pd.concat(parts, ignore_index=True)
    if "error" in table:  # unreadable images (`predict` / `evaluate --images`): nothing to show
        table = table[table["error"].isna()].reset_index(drop=True)
    missing = ({"pred"} | (set() if "path" in table else {"relpath"})) - set(table)
    if missing:
        raise DatasetError(f"predictions {csvs[0]} lack column(s) {sorted(missing)}; expected "
                           "relpath (or path), label, pred, confidence, prob_<class>")
    prob_classes = [c[5:] for c in table if c.startswith("prob_")]
    classes = list(meta.get("classes") or prob_classes or sorted(table["pred"].unique()))
    if meta and prob_classes and set(prob_classes) != set(classes):
        raise CheckpointError(f"checkpoint {checkpoint} predicts {classes} but the predictions "
                              f"have probabilities for {prob_classes}: they come from different runs")
    foreign = sorted(set(table["pred"]) - set(classes))
    if foreign:
        raise CheckpointError(f"predicted classes {foreign} are not among the classes {classes}")
    if "label" not in table:
        table["label"] = UNLABELLED
    table["label"] = table["label"].fillna(UNLABELLED).astype(str)
    if "confidence" not in table:
        table["confidence"] = table[[f"prob_{c}" for c in classes]].max(1) if prob_classes else np.nan
    if "dataset" not in table:
        table["dataset"] = dataset or meta.get("dataset") or "unknown"
    if "relpath" not in table:
        table["relpath"] = table["path"]
    if "path" not in table:
        from leukemia_core.data.dataroot import resolve_data_root
        root = resolve_data_root(data_root)[0]  # the cache is keyed on the resolved root
        roots = {d: _dataset_folder(d, root) for d in table["dataset"].unique()}
        table["path"] = [str(roots[d] / r) for d, r in zip(table["dataset"], table["relpath"])]
    absent = [p for p in table["path"] if not Path(p).is_file()]
    if absent:
        raise DatasetError(f"{len(absent)} image(s) of the predictions are missing, e.g. {absent[:3]}; "
                           "is the data root (--data-root / LEUKEMIA_DATA) the one the run used?")
    return ExplorerData(table, classes, model, meta, thumb_px)


# --------------------------------------------------------------------------- the data side
def _uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _json_list(value) -> list:
    if isinstance(value, list):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return []
    try:
        out = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"expected a JSON list, got {str(value)[:80]!r}: {exc}") from exc
    if not isinstance(out, list):
        raise DatasetError(f"expected a JSON list, got {type(out).__name__}: {str(value)[:80]!r}")
    return out


def _remember(cache: dict, key, value, limit: int = 3000) -> None:
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


class ExplorerData:
    """Filters, confusion counts, thumbnails and cached CAM overlays of one predictions table."""

    def __init__(self, table: pd.DataFrame, classes: list[str], model=None, meta: dict | None = None,
                 thumb_px: int = 112):
        self.table = table.reset_index(drop=True)
        self.classes, self.model, self.meta, self.thumb_px = list(classes), model, meta or {}, thumb_px
        extra = sorted(set(self.table["label"]) - set(self.classes))
        self.true_classes = self.classes + extra  # e.g. "(none)" for unlabelled images
        # caches (thumbnails, data URIs, CAMs), emptied when they reach CACHE_LIMIT entries
        self._thumbs: dict[int, np.ndarray] = {}
        self._uris: dict[tuple, str] = {}
        self._cams: dict[tuple, np.ndarray] = {}
        self.timings: deque[tuple[str, float]] = deque(maxlen=200)  # (what, seconds) of recent work

    @property
    def has_cams(self) -> bool:
        return self.model is not None

    def options(self, column: str) -> list[str]:
        return sorted(self.table[column].astype(str).unique())

    def select(self, dataset=ALL, split=ALL, true=ALL, pred=ALL, confidence=(0.0, 1.0)) -> pd.DataFrame:
        """Rows matching every filter, most confident first (ties by relpath)."""
        t = self.table
        keep = t["confidence"].between(*confidence) | t["confidence"].isna()
        for col, value in (("dataset", dataset), ("split", split), ("label", true), ("pred", pred)):
            if value not in (None, ALL):
                keep &= t[col].astype(str) == value
        return t[keep].sort_values(["confidence", "relpath"], ascending=[False, True], kind="stable")

    def confusion(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Image counts, true classes (rows) by predicted classes (columns)."""
        return pd.crosstab(rows["label"], rows["pred"]).reindex(
            index=self.true_classes, columns=self.classes, fill_value=0)

    def topk(self, i: int, k: int) -> list[tuple[str, float]]:
        row = self.table.loc[i]
        probs = [(c, float(row[f"prob_{c}"])) for c in self.classes if f"prob_{c}" in row]
        return sorted(probs, key=lambda p: -p[1])[:k]

    def thumbnail(self, i: int) -> np.ndarray:
        """The image as a ``thumb_px`` square (uint8 RGB), with detection boxes drawn."""
        if i not in self._thumbs:
            from PIL import Image, ImageDraw

            from leukemia_core.data.torch_dataset import read_image
            im = read_image(self.table.at[i, "path"])
            sx, sy = self.thumb_px / im.width, self.thumb_px / im.height
            im = im.resize((self.thumb_px, self.thumb_px), Image.BILINEAR)
            for b in self.boxes(i):
                x0, y0, x1, y1 = b["box"]
                ImageDraw.Draw(im).rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=(255, 215, 0), width=2)
            _remember(self._thumbs, i, np.asarray(im))
        return self._thumbs[i]

    def boxes(self, i: int) -> list[dict]:
        if "boxes" not in self.table:
            return []
        out = _json_list(self.table.at[i, "boxes"])
        for b in out:
            if not isinstance(b, dict) or len(b.get("box", ())) != 4:
                raise DatasetError(f"row {self.table.at[i, 'relpath']}: each box needs "
                                   f"'box': [x0, y0, x1, y1]; got {str(b)[:80]}")
        return out

    def sentences(self, i: int) -> list[tuple[str, float | None]]:
        if "top_sentences" not in self.table:
            return []
        return [(s[0], float(s[1])) if isinstance(s, (list, tuple)) else (str(s), None)
                for s in _json_list(self.table.at[i, "top_sentences"])]

    def compute_cams(self, indices, method: str) -> None:
        """CAMs (for the predicted class) of the rows not cached yet, in one batch."""
        todo = [i for i in indices if (i, method) not in self._cams]
        if not todo or not self.has_cams:
            return
        import torch

        from leukemia_core.data.torch_dataset import read_image
        from leukemia_core.explain.cams import compute_cams
        from leukemia_core.pipeline import eval_transform
        start = time.perf_counter()
        tf = eval_transform(self.meta)
        x = torch.stack([tf(read_image(self.table.at[i, "path"])) for i in todo])
        targets = [self.classes.index(self.table.at[i, "pred"]) for i in todo]
        for i, cam in zip(todo, compute_cams(self.model, x, method, targets)):
            _remember(self._cams, (i, method), cam)
        self.timings.append((f"{len(todo)} CAMs ({method})", time.perf_counter() - start))

    def image_uri(self, i: int, method: str | None = None) -> str:
        """The thumbnail (with the CAM of ``method`` over it) as a data URI, cached."""
        key = (i, method)
        if key not in self._uris:
            image = self.thumbnail(i)
            if method:
                from leukemia_core.explain.cams import overlay
                self.compute_cams([i], method)
                image = overlay(image, self._cams[(i, method)])
            _remember(self._uris, key, _uri(image))
        return self._uris[key]

    def grid_html(self, rows: pd.DataFrame, method: str | None = None, k: int = 3) -> str:
        """The image grid: one ``<figure data-relpath=...>`` per row (img alt = relpath)."""
        if method:
            self.compute_cams(rows.index, method)
        esc = lambda s: html.escape(str(s), quote=True)
        cells = []
        for i, r in rows.iterrows():
            probs = "<br>".join(f"{esc(c)} {p:.2f}" for c, p in self.topk(i, k))
            extra = "".join(f"<li>{esc(s)}" + (f" ({p:.2f})" if p is not None else "") + "</li>"
                            for s, p in self.sentences(i))
            extra = f'<ul class="lk-sentences">{extra}</ul>' if extra else ""
            caps = "".join(f"<li>{esc(b.get('label', 'box'))}"
                           + (f" {float(b['score']):.2f}" if b.get("score") is not None else "")
                           + (f": {esc(self._caption(b))}" if self._caption(b) else "") + "</li>"
                           for b in self.boxes(i))
            extra += f'<ul class="lk-boxes">{caps}</ul>' if caps else ""
            cells.append(
                f'<figure class="lk-cell" data-relpath="{esc(r.relpath)}" data-label="{esc(r.label)}" '
                f'data-pred="{esc(r.pred)}" data-cam="{esc(method or "off")}" '
                f'style="margin:3px;width:{self.thumb_px + 8}px;font-size:11px;line-height:1.2">'
                f'<img alt="{esc(r.relpath)}" title="{esc(r.relpath)}" src="{self.image_uri(i, method)}" '
                f'width="{self.thumb_px}" height="{self.thumb_px}">'
                f'<figcaption><b>{esc(r.label)} → {esc(r.pred)}</b><br>{probs}{extra}</figcaption></figure>')
        return ('<div class="lk-grid" style="display:flex;flex-wrap:wrap">' + "".join(cells) + "</div>"
                if cells else '<div class="lk-grid"><i>No image matches these filters.</i></div>')

    @staticmethod
    def _caption(box: dict) -> str:
        cap = box.get("caption") or box.get("attributes") or ""
        return ", ".join(f"{k}: {v}" for k, v in cap.items()) if isinstance(cap, dict) else str(cap)


# --------------------------------------------------------------------------- the widgets
class PredictionExplorer:
    """The ipywidgets app over :class:`ExplorerData`; display it, or use ``.widget``."""

    def __init__(self, data: ExplorerData, page_size: int = 24):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.data, self.page_size = data, page_size
        d = data
        lay = dict(layout=w.Layout(width="190px"), style={"description_width": "70px"})
        self.dataset = w.Dropdown(options=[ALL] + d.options("dataset"), description="dataset", **lay)
        self.split = w.Dropdown(options=[ALL] + d.options("split"), description="split", **lay)
        self.true = w.Dropdown(options=[ALL] + d.true_classes, description="true", **lay)
        self.pred = w.Dropdown(options=[ALL] + d.classes, description="predicted", **lay)
        self.conf = w.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.01,
                                       description="confidence", style={"description_width": "75px"})
        self.cam = w.ToggleButton(value=False, description="CAM overlay", disabled=not d.has_cams,
                                  tooltip="needs the run's checkpoint" if not d.has_cams else "")
        from leukemia_core.explain.cams import METHODS
        self.method = w.Dropdown(options=list(METHODS), description="method", **lay)
        self.k = w.BoundedIntText(value=min(3, len(d.classes)), min=1, max=len(d.classes),
                                  description="top-k", layout=w.Layout(width="130px"),
                                  style={"description_width": "40px"})
        self.page = w.BoundedIntText(value=1, min=1, max=1, description="page",
                                     layout=w.Layout(width="130px"), style={"description_width": "40px"})
        self.status = w.HTML()
        self.grid = w.HTML(layout=w.Layout(flex="1 1 480px"))
        for name in ("dataset", "split", "true", "pred", "conf", "cam", "method", "k", "page",
                     "status", "grid"):
            getattr(self, name).add_class(f"lk-{name}")
        cm = d.confusion(d.table)
        # the layout goes in at construction: updates made before the widget is shown are lost
        self.figure = go.FigureWidget(data=[go.Heatmap(
            z=cm.values, x=list(cm.columns), y=list(cm.index), colorscale="Blues", showscale=False,
            text=cm.values, texttemplate="%{text}",
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>")],
            layout=dict(width=440, height=440, margin=dict(l=90, r=10, t=40, b=90),
                        xaxis=dict(title="predicted"), yaxis=dict(title="true", autorange="reversed"),
                        title=dict(text="click a cell to see its images", font_size=13)))
        self.figure.data[0].on_click(self._on_cell)
        self._busy = False
        for c in (self.dataset, self.split, self.true, self.pred, self.conf, self.cam, self.method,
                  self.k, self.page):
            c.observe(self._on_change, names="value")
        controls = w.VBox([w.HBox([self.dataset, self.split, self.true, self.pred, self.conf]),
                           w.HBox([self.cam, self.method, self.k, self.page, self.status])])
        self.widget = w.VBox([controls, w.HBox([self.figure, self.grid],
                                              layout=w.Layout(flex_flow="row wrap"))])
        self.widget.add_class("lk-explorer")
        self.refresh()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_change(self, change):
        """Any control: back to page 1 (unless it was the page), then redraw."""
        if self._busy:
            return
        if change["owner"] is not self.page:
            self._quietly(page=1)
        self.refresh(matrix=change["owner"] is not self.page)

    def _quietly(self, **values):
        """Set control values without each one triggering a redraw."""
        self._busy = True
        try:
            for name, value in values.items():  # page_max: the page control's maximum
                if name == "page_max":
                    self.page.max = value
                else:
                    getattr(self, name).value = value
        finally:
            self._busy = False

    def _on_cell(self, trace, points, selector):
        """A click on the confusion matrix selects that (true, predicted) pair."""
        if points.xs:
            self._quietly(true=str(points.ys[0]), pred=str(points.xs[0]), page=1)
            self.refresh()

    def filters(self) -> dict:
        return dict(dataset=self.dataset.value, split=self.split.value, true=self.true.value,
                    pred=self.pred.value, confidence=tuple(self.conf.value))

    def refresh(self, matrix: bool = True) -> float:
        """Redraw the matrix and the grid for the current filters; returns the seconds taken."""
        start = time.perf_counter()
        f = self.filters()
        rows = self.data.select(**f)
        if matrix:  # the matrix shows every cell under the other filters, the chosen one outlined
            cm = self.data.confusion(self.data.select(**(f | {"true": ALL, "pred": ALL})))
            with self.figure.batch_update():
                self.figure.data[0].z = cm.values
                self.figure.data[0].text = cm.values
                shapes = []
                if f["true"] != ALL and f["pred"] != ALL:
                    x, y = self.data.classes.index(f["pred"]), self.data.true_classes.index(f["true"])
                    shapes = [dict(type="rect", x0=x - .5, x1=x + .5, y0=y - .5, y1=y + .5,
                                   line=dict(color="crimson", width=3))]
                self.figure.layout.shapes = shapes
        pages = max(1, -(-len(rows) // self.page_size))
        self._quietly(page_max=pages)
        first = (min(self.page.value, pages) - 1) * self.page_size
        shown = rows.iloc[first:first + self.page_size]
        method = self.method.value if self.cam.value and self.data.has_cams else None
        self.grid.value = self.data.grid_html(shown, method, self.k.value)
        took = time.perf_counter() - start
        self.status.value = (f'<span data-count="{len(rows)}" data-ms="{took * 1000:.0f}">'
                             f"{len(rows)} image(s); showing {first + 1 if len(rows) else 0}–"
                             f"{first + len(shown)} of page {min(self.page.value, pages)}/{pages} "
                             f"({took * 1000:.0f} ms)</span>")
        self.data.timings.append(("refresh", took))
        return took


def explorer(run: str | Path | ExplorerData | None = None, checkpoint=None, data_root=None,
             page_size: int = 24, thumb_px: int = 112) -> PredictionExplorer:
    """The prediction explorer for a run folder or predictions CSV (default: ``$LEUKEMIA_EXPLORER_RUN``)."""
    if run is None:
        run = os.environ.get(RUN_ENV)
        if not run:
            raise LeukemiaError(f"no run given: pass a run folder or set {RUN_ENV}")
    data = run if isinstance(run, ExplorerData) else load_run(run, checkpoint, data_root, thumb_px=thumb_px)
    return PredictionExplorer(data, page_size)


# --------------------------------------------------------------------------- serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def voila_command(port: int) -> list[str]:
    return [sys.executable, "-m", "voila", str(APP), "--no-browser", f"--port={port}",
            "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
            # jupytext's lab extension needs JupyterLab's document manager, absent in Voilà
            "--VoilaConfiguration.extension_denylist=jupyterlab-jupytext"]


def _env(run, data_root=None) -> dict:
    env = dict(os.environ)
    env[RUN_ENV] = str(Path(run).resolve())
    if data_root:
        env["LEUKEMIA_DATA"] = str(data_root)
    env["JUPYTER_PATH"] = os.pathsep.join(  # the venv's kernelspec, as book/build.py does
        p for p in (str(Path(sys.prefix) / "share" / "jupyter"), env.get("JUPYTER_PATH")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextmanager
def serve(run, port: int = 0, data_root=None, timeout: float = 120, log: str | Path | None = None):
    """Run the Voilà app for ``run`` on 127.0.0.1 (a free port by default); yield its URL.

    The server is stopped on exit; if it does not come up, the error carries its log."""
    port = port or free_port()
    log = Path(log) if log else Path(os.environ.get("TMPDIR", "/tmp")) / f"voila-explorer-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(voila_command(port), env=_env(run, data_root), stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LeukemiaError(f"Voilà exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise LeukemiaError(f"Voilà did not listen on port {port} within {timeout:.0f} s:\n"
                                        f"{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
