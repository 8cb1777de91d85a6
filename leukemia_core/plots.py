"""Figures shared by the chapters: plotly (interactive) and matplotlib (galleries)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import NotebookRenderer


class OfflineRenderer(NotebookRenderer):
    """plotly.js is embedded once (on activation); each figure is a plain HTML div.

    Jupyter Book 1 drops plotly's default mime type silently; plain ``text/html``
    survives, and embedding plotly.js keeps the book working offline.
    """

    def __init__(self):
        super().__init__(connected=False, include_plotlyjs=True)

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False,
                           full_html=False, default_width="100%", default_height=480,
                           validate=False)
        return {"text/html": html}


def use_offline_plotly() -> None:
    """Make plotly figures render as offline HTML in notebooks and the built book."""
    pio.renderers["offline"] = OfflineRenderer()
    pio.renderers.default = "offline"


def learning_curves(histories: dict[str, list[dict]], metric: str = "val_accuracy") -> go.Figure:
    """Training loss and a validation metric per epoch, one line per run."""
    rows = [{"run": name, "epoch": h["epoch"] + 1, "train loss": h["train_loss"],
             metric: h.get(metric)} for name, hist in histories.items() for h in hist]
    df = pd.DataFrame(rows)
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", metric.replace("_", " ")))
    for i, (name, part) in enumerate(df.groupby("run", sort=False)):
        colour = pio.templates["plotly"].layout.colorway[i % 10]
        fig.add_scatter(x=part["epoch"], y=part["train loss"], name=name, legendgroup=name,
                        line_color=colour, row=1, col=1)
        fig.add_scatter(x=part["epoch"], y=part[metric], name=name, legendgroup=name,
                        showlegend=False, line_color=colour, row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=380, margin=dict(t=40, b=40))
    return fig


def confusion_matrix_figure(cm, classes: list[str], title: str = "", normalize: bool = True) -> go.Figure:
    """Heatmap of a confusion matrix (rows: true class); hover shows counts."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / cm.sum(1, keepdims=True).clip(min=1) if normalize else cm
    fig = go.Figure(go.Heatmap(
        z=shown, x=classes, y=classes, colorscale="Blues", zmin=0,
        customdata=cm.astype(int), text=np.round(shown, 2 if normalize else 0), texttemplate="%{text}",
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata} images<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed", height=460, margin=dict(t=50))
    return fig


def per_class_bars(per_class: dict[str, dict[str, dict]], metric: str = "f1") -> go.Figure:
    """Grouped bars of a per-class metric, one group per run."""
    rows = [{"run": run, "class": c, metric: v[metric]} for run, pc in per_class.items()
            for c, v in pc.items()]
    import plotly.express as px
    fig = px.bar(pd.DataFrame(rows), x="class", y=metric, color="run", barmode="group")
    fig.update_layout(yaxis_range=[min(0.5, min(r[metric] for r in rows) - 0.05), 1.0], height=380)
    return fig


def image_grid(paths, titles=None, ncols: int = 8, size: float = 1.6):
    """A matplotlib grid of images (static: better than plotly for galleries).

    ``paths`` may hold file paths, PIL images or ``HxWx3`` arrays."""
    import matplotlib.pyplot as plt
    from PIL import Image

    paths = list(paths)
    nrows = max(1, int(np.ceil(len(paths) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.35)))
    for ax in np.ravel(axes):
        ax.axis("off")
    for i, (ax, p) in enumerate(zip(np.ravel(axes), paths)):
        if isinstance(p, (np.ndarray, Image.Image)):
            ax.imshow(p)
        else:
            with Image.open(p) as im:
                ax.imshow(im.convert("RGB"))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def tree_figure(taxonomy, counts: dict[str, int] | None = None, title: str = "") -> go.Figure:
    """A taxonomy drawn left to right: depth on x, leaves spread on y, each parent at
    the mean height of its children. Leaves without data are grey, with their note."""
    counts = counts or {}
    y: dict[str, float] = {}
    for i, leaf in enumerate(taxonomy.leaves):
        y[leaf] = -i

    def place(name):
        node = taxonomy[name]
        if node.children:
            y[name] = float(np.mean([place(c) for c in node.children]))
        return y[name]

    place(taxonomy.root)
    fig = go.Figure()
    for parent, child in taxonomy.edges():
        px_, cx = taxonomy[parent].depth, taxonomy[child].depth
        fig.add_scatter(x=[px_, px_ + 0.5, px_ + 0.5, cx], y=[y[parent], y[parent], y[child], y[child]],
                        mode="lines", line=dict(color="#999", width=1), hoverinfo="skip", showlegend=False)
    for has_data in (True, False):
        names = [n for n in taxonomy.nodes if taxonomy.has_data(n) == has_data]
        if not names:
            continue
        hover = []
        for n in names:
            node = taxonomy[n]
            extra = node.note or node.description
            src = f"<br>sources: {', '.join(node.sources)}" if node.sources else ""
            hover.append(f"<b>{n}</b>{src}<br>images: {counts.get(n, 0):,}" + (f"<br>{extra}" if extra else ""))
        labels = [f"{n} ({counts[n]:,})" if n in counts else n for n in names]
        fig.add_scatter(x=[taxonomy[n].depth for n in names], y=[y[n] for n in names], mode="markers+text",
                        text=labels, textposition="middle right", hovertext=hover, hoverinfo="text",
                        marker=dict(size=12, color="#1f77b4" if has_data else "#bbbbbb"),
                        name="has images" if has_data else "no public images")
    fig.update_xaxes(visible=False, range=[-0.2, taxonomy.depth + 1.2])
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=60 + 34 * len(taxonomy.leaves), margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h"))
    return fig


def source_markdown(*objects, title: str | None = None) -> str:
    """The package source of ``objects`` (functions, classes, methods) as Markdown.

    Each block is headed by the file and line range it comes from, so a reader of the book
    sees the method's own code and the page cannot drift from the package: the text is read
    from the installed source when the chapter runs."""
    import inspect
    import textwrap
    from pathlib import Path

    parts = [f"**{title}**\n"] if title else []
    for obj in objects:
        target = inspect.unwrap(obj)
        lines, start = inspect.getsourcelines(target)
        path = Path(inspect.getsourcefile(target)).resolve()
        parts_of_path = path.parts
        rel = "/".join(parts_of_path[parts_of_path.index("leukemia_core"):]) \
            if "leukemia_core" in parts_of_path else path.name
        qualname = getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))
        code = textwrap.dedent("".join(lines))
        parts.append(f"From `{rel}`, lines {start}–{start + len(lines) - 1} (`{qualname}`):\n\n"
                     f"```python\n{code.rstrip()}\n```\n")
    return "\n".join(parts)


def show_source(*objects, title: str | None = None):
    """Display :func:`source_markdown` in a notebook (tag the cell ``remove-input`` so that
    the page shows only the code it prints)."""
    from IPython.display import Markdown, display

    display(Markdown(source_markdown(*objects, title=title)))
