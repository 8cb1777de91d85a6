"""Exercise ex-det-patch-fraction of chapter 07: another patch share than the profile's.

The tests' smoke book ran the chapter with ``patch_fractions = [0.1]`` (tests/exercises.py):
it must train a naive and a masked detector at that share (one results file each, named by
the share), and the kept-boxes table must show a share of the boxes kept near the patch's
share of the image (a uniformly placed patch covers a uniformly placed point with
probability equal to its share, ex-det-coverage)."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_exercise

pytestmark = pytest.mark.slow  # reads the smoke book


def kept_shares(nb) -> dict[int, float]:
    """Patch share in percent -> share of the boxes kept, read from the kept-boxes table
    (a pandas Styler: its first data column is "boxes kept")."""
    html = "\n".join(o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
                     if "text/html" in o.get("data", {}) and "boxes kept" in o["data"]["text/html"])
    rows = re.findall(r">(\d+)% patch</th>\s*<td[^>]*>([\d.]+)%</td>", html)
    return {int(f): float(k) / 100 for f, k in rows}


def test_exercise_patch_fraction(data_root):
    nb, results, _ = run_exercise("07_detection")
    for regime in ("naive", "masked"):
        r = json.loads((results / f"detection_{regime}_10.json").read_text())
        assert r["config"]["patch_fraction"] == 0.1 and r["config"]["train"]["regime"] == regime
        assert r["profile_sizes"]["chapter"]["fractions"] == [0.1]
    kept = kept_shares(nb)
    assert set(kept) == {10}, kept
    assert 0.1 / 3 < kept[10] < 0.3, f"a 10% patch kept {kept[10]:.0%} of the boxes"
