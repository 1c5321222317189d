"""Where every benchmark script writes its JSON: ``--out DIR``, by default ``outputs/benchmarks``.

The committed results in ``benchmarks/results/`` (the numbers the docs quote) are rewritten
only when asked for, ``--out benchmarks/results``, so a quick or exploratory run never
changes a tracked file. ``rl2fx bench --out DIR`` passes its folder on to each script.

Used by the scripts as ``from _results import add_out_argument, write_json`` (a script's own
folder is first on ``sys.path`` when it runs as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rl2fx.cli import BENCH_OUT, BENCH_SHIPPED_OUT

__all__ = ["BENCH_OUT", "BENCH_SHIPPED_OUT", "add_out_argument", "result_path", "write_json"]


def _out_dir(text: str) -> str:
    """``--out``'s value: a folder. A ``.json`` path (the old meaning of ``--out``) is refused before
    the benchmark runs, not after."""
    if Path(text).suffix == ".json":
        raise argparse.ArgumentTypeError(f"{text!r} looks like a file; --out takes a folder "
                                         "(the script writes its <name>.json in it)")
    return text


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--out DIR`` (default :data:`BENCH_OUT`) to a benchmark's parser."""
    parser.add_argument("--out", metavar="DIR", type=_out_dir, default=BENCH_OUT,
                        help=f"folder for the JSON results (default {BENCH_OUT}; "
                             f"--out {BENCH_SHIPPED_OUT} rewrites the committed ones)")


def result_path(out_dir: str | os.PathLike[str], name: str) -> Path:
    """``out_dir/name``, with ``out_dir`` created; ``name`` is a file name, not a path."""
    if Path(name).name != name:
        raise ValueError(f"name={name!r} must be a file name without folders; the folder is --out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def write_json(out_dir: str | os.PathLike[str], name: str, data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` as ``out_dir/name`` (via a temporary file, so a reader never sees half a file); print
    and return the path."""
    path = result_path(out_dir, name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    tmp.replace(path)
    print(f"saved {path}", flush=True)
    return path
