"""``leukemia-core explore RUN`` (and ``python -m leukemia_core.cli.explore``): serve the
prediction explorer (:mod:`leukemia_core.explain.explorer`) with Voilà until Ctrl-C."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import LeukemiaError
from leukemia_core.explain.explorer import _env, load_run, voila_command


def main(argv: list[str] | None = None) -> int:
    """``python -m leukemia_core.cli.explore RUN [--port 8866]``: serve the app until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description="Serve the prediction explorer with Voilà on 127.0.0.1")
    ap.add_argument("run", help="run folder (model.safetensors + predictions_<split>.csv) or a predictions CSV")
    ap.add_argument("--port", type=int, default=8866)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not run.exists():
        print(f"error: {run} does not exist; run `make book` (or `make explore-checkpoint`) first",
              file=sys.stderr)
        return 2
    try:
        load_run(run, data_root=args.data_root)  # fail here, with one message, not in the browser
    except LeukemiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {run} at http://127.0.0.1:{args.port}/ (Voilà; Ctrl-C stops it)", flush=True)
    env = _env(run, args.data_root)  # the run's absolute path, before leaving this folder
    os.chdir(REPO_ROOT)  # Voilà serves files below its working directory: the app is there
    os.execvpe(sys.executable, voila_command(args.port), env)


if __name__ == "__main__":
    sys.exit(main())
