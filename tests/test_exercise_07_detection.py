"""Exercise ex-det-patch-fraction of chapter 07: other patch shares than the profile's.

The chapter runs under ``smoke`` with ``patch_fractions = [0.1, 0.5]``: it must train a
naive and a masked detector per share (one results file each, named by the share), and
the kept-boxes table must show that the larger patch keeps the larger share of the
boxes, each near its patch's share of the image (a uniformly placed patch covers a
uniformly placed point with probability equal to its share, ex-det-coverage)."""
from __future__ import annotations

import json
import re

from conftest import run_exercise


def kept_shares(nb) -> dict[int, float]:
    """Patch share in percent -> share of the boxes kept, read from the kept-boxes table
    (a pandas Styler: its first data column is "boxes kept")."""
    html = "\n".join(o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
                     if "text/html" in o.get("data", {}) and "boxes kept" in o["data"]["text/html"])
    rows = re.findall(r">(\d+)% patch</th>\s*<td[^>]*>([\d.]+)%</td>", html)
    return {int(f): float(k) / 100 for f, k in rows}


def test_exercise_patch_fraction(tmp_path, data_root):
    nb = run_exercise("07_detection", tmp_path, patch_fractions=[0.1, 0.5],
                      results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    out = tmp_path / "results" / "smoke"
    written = sorted(p.name for p in out.glob("detection_*.json"))
    assert written == ["detection_attributes.json", "detection_full.json", "detection_masked_10.json",
                       "detection_masked_50.json", "detection_naive_10.json", "detection_naive_50.json"], written
    for regime in ("naive", "masked"):
        for pct, f in ((10, 0.1), (50, 0.5)):
            r = json.loads((out / f"detection_{regime}_{pct}.json").read_text())
            assert r["config"]["patch_fraction"] == f and r["config"]["train"]["regime"] == regime
            assert r["profile_sizes"]["chapter"]["fractions"] == [0.1, 0.5]
    assert (tmp_path / "runs" / "smoke" / "detection" / "detector_full.safetensors").is_file()

    kept = kept_shares(nb)
    assert set(kept) == {10, 50}, kept
    assert kept[10] < kept[50], f"the larger patch must keep more boxes: {kept}"
    for pct, share in kept.items():  # near the patch's share (a small smoke sample: loose bounds)
        assert pct / 100 / 3 < share < min(1.0, 3 * pct / 100), kept
