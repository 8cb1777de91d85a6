# ---
# jupyter:
#   book:
#     requires_data: true
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The prediction explorer
#
# An interactive companion to every classification chapter: pick a run, filter its
# predictions by dataset, split, true class, predicted class and confidence, click a cell
# of the confusion matrix to see its images, show the top-k probabilities under each
# image, and lay a CAM over them with any method of {doc}`09_explain`. For
# vision-language runs it lists the best-matching sentences, for detection runs it draws
# the boxes with their attribute captions (optional `top_sentences` / `boxes` columns of
# the predictions table).
#
# :::{important}
# **The widgets are not live on this static page**: they need a running Python kernel.
# The pictures below are screenshots. To use the explorer, run it yourself:
#
# ```bash
# make explore                       # serves the app at http://127.0.0.1:8866 (Voilà)
# make explore RUN=runs/my_run PORT=8870   # any run folder written by `leukemia-core train`
# ```
#
# `make explore` serves the ConvNeXt-Atto baseline of {doc}`03_baseline` from
# `_build/artifacts/ci/pbc_convnext_atto_s0/`, which `make book` leaves there; from a
# fresh clone without a built book, it first trains that checkpoint the same way
# (`make explore-checkpoint`: `leukemia-core train` under the `ci` profile, a few minutes
# on a laptop CPU). In JupyterLab, open this chapter (`notebooks/10_explorer.py`) and run
# it: the last cell shows the live explorer.
# :::
#
# A run is what `leukemia-core train` writes: `model.safetensors` (weights and metadata:
# architecture, classes, image size, normalisation) and `predictions_<split>.csv`
# (`relpath, label, pred, confidence, prob_<class>`; `relpath` is relative to the
# dataset's folder under the data root). A predictions CSV alone works too, without CAMs.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: which baseline run the live explorer opens
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
artifacts = "_build/artifacts"
run = "pbc_convnext_atto_s0"

# %%
import json

from IPython.display import Image, Markdown, display

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.explain.explorer import SCREENSHOTS, explorer

# %% [markdown]
# ## Screenshots
#
# The screenshots come from the browser test `tests/test_explorer_browser.py`, which
# `make test` runs before `make book` (CI does exactly that). It trains a small ConvNeXt-Atto
# under the `smoke` profile, serves the explorer with Voilà on a free port of 127.0.0.1,
# drives it with headless Chromium, asserts that the grid shows exactly the images of the
# clicked cell and that the CAM overlay changes them, and saves the screenshots to
# `_build/screenshots/explorer/` (git-ignored). This page embeds them when they are there
# and says so when they are not, so the book builds either way. The smoke model is weak
# on purpose (seconds to train): the numbers in the screenshots are not the baseline's.

# %%
info_file = SCREENSHOTS / "shots.json"
shots = [("explorer_cell.png", "A class filter and a click on a confusion-matrix cell: the grid "
          "shows that cell's test images, most confident first, each with its top-3 probabilities."),
         ("explorer_cam.png", "The same cell with the Grad-CAM overlay on (CAMs of the predicted class).")]
if info_file.exists() and all((SCREENSHOTS / f).exists() for f, _ in shots):
    info = json.loads(info_file.read_text())
    true, pred = info["cell"]
    display(Markdown(
        f"Taken {info['taken']} by the browser test on a {info['checkpoint']} "
        f"(test accuracy {info['test_accuracy']:.0%}); the clicked cell is true **{true}**, "
        f"predicted **{pred}** ({info['images_in_cell']} images)."))
    for name, caption in shots:
        display(Markdown(f"**{caption}**"))
        display(Image(filename=str(SCREENSHOTS / name)))
    rows = "\n".join(f"| {what} | {s * 1000:.0f} ms |" for what, s in info["timings_s"].items())
    display(Markdown("How long each interaction took in that test (browser: from the action "
                     "until the grid shows the result; server: the Python side alone):\n\n"
                     f"| interaction | time |\n|---|---|\n{rows}"))
else:
    display(Markdown(
        "**No screenshots yet.** They are taken by the browser test "
        "(`python -m pytest tests/test_explorer_browser.py`, part of `make test`), which needs "
        "Chromium at `/usr/bin/chromium`. Run it, then rebuild the book."))

# %% [markdown]
# ## The live explorer
#
# In JupyterLab the next cell shows the explorer for the baseline run of the chosen
# profile. When the book is built it runs too (so a broken explorer breaks the build), but
# its output is left off this static page.

# %% tags=["remove-output"]
app = explorer(REPO_ROOT / artifacts / profile / run, data_root=data_root)
print(f"{len(app.data.table)} predictions, {len(app.data.classes)} classes, "
      f"first view drawn in {app.data.timings[-1][1] * 1000:.0f} ms")
app
