"""Fast engine vs reference engine: seconds per cell, speed-up, peak memory and IIA, side by side.

Every measurement runs in a fresh subprocess (so peak memory is that engine's alone), and the
engines alternate (fast, reference, fast, reference...) so drift in machine load hits both.

    python benchmarks/bench_engines.py                       # default model and grid
    python benchmarks/bench_engines.py --epochs 1 --layers 4,16,28 --repeats 1
    python benchmarks/bench_engines.py --overrides model=gpt2 device=cuda

Single cells: block_output at the middle layer, at an early (`name1`), a middle (`s2`) and the last
position. Sweep: the default grid (or --layers) run through `das_cli.run`. Writes a Markdown table
to --out and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("fast", "reference")
CELL_POSITIONS = {"early": "name1", "middle": "s2", "last": "last"}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One measurement: run `das_cli.run` with the given overrides, print one JSON line."""
    import torch

    import das_cli
    from das_cli.engines import base_run
    from das_cli.models import load_model
    from das_cli.sweep import build_pairs

    cfg = das_cli.compose(args.overrides + ["progress=false", "output.plots=false"])
    cache_mb = _cache_mb(cfg, load_model, build_pairs, base_run) if args.engine_name == "fast" else 0.0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        table = das_cli.run(cfg, folder)
        seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cell_seconds": float(table["seconds"].sum()),
        "cells": len(table),
        "iia": table["iia"].round(4).tolist(),
        "loss": table["loss"].round(5).tolist(),
        "peak_rss_mb": peak_rss_mb(),
        "cache_mb": cache_mb,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print("RESULT " + json.dumps(result))


def _cache_mb(cfg, load_model, build_pairs, base_run) -> float:
    """Bytes the fast engine keeps: base keys/values and residuals of the swept layers."""
    from das_cli import config as C

    cfg = C.typed(cfg)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    layers = tuple(C.layers(cfg, lm.n_layers))
    total = 0
    for pairs in build_pairs(cfg, lm):
        run = base_run(lm, pairs, int(cfg.eval.batch_size), True, layers)
        for group_prefix, group_residuals in zip(run.prefixes, run.residuals):
            total += sum(k.nbytes + v.nbytes for k, v in group_prefix)
            total += sum(r.nbytes for r in group_residuals.values())
    return total / 2**20


def measure(overrides: list[str], engine: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--engine-name", engine, "--overrides",
               *overrides, f"train.engine={engine}"]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker failed ({' '.join(overrides)}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def alternate(overrides: list[str], repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for _ in range(repeats):
        for engine in ENGINES:
            runs[engine].append(measure(overrides, engine))
            print(f"  {engine:9s} {runs[engine][-1]['cell_seconds']:8.1f} s  {' '.join(overrides)}", flush=True)
    return runs


def row(name: str, runs: dict[str, list[dict]]) -> str:
    fast, ref = (min(r["cell_seconds"] for r in runs[e]) / runs[e][0]["cells"] for e in ENGINES)
    first = {e: runs[e][0] for e in ENGINES}
    iia_gap = max(abs(a - b) for a, b in zip(first["fast"]["iia"], first["reference"]["iia"]))
    mean_iia = {e: sum(first[e]["iia"]) / len(first[e]["iia"]) for e in ENGINES}
    mem = {e: max(r["peak_rss_mb"] for r in runs[e]) for e in ENGINES}
    return (
        f"| {name} | {first['fast']['cells']} | {fast:.2f} | {ref:.2f} | **{ref / fast:.1f}×** | "
        f"{mem['fast']:.0f} | {mem['reference']:.0f} | {first['fast']['cache_mb']:.0f} | "
        f"{mean_iia['fast']:.3f} | {mean_iia['reference']:.3f} | {iia_gap:.3f} |"
    )


HEADER = (
    "| measurement | cells | fast s/cell | reference s/cell | speed-up | fast peak RSS MB | "
    "reference peak RSS MB | fast caches MB | fast mean IIA | reference mean IIA | max abs IIA gap |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-name", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help="das-cli overrides for every run")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs for every run")
    parser.add_argument("--layers", default=None, help="comma-separated layers for the sweep (default: the config's)")
    parser.add_argument("--cell-layer", type=int, default=None, help="layer of the single cells (default: middle)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", default="benchmarks/results.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    base = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    n_layers = _n_layers(base)
    cell_layer = args.cell_layer if args.cell_layer is not None else n_layers // 2
    lines = [HEADER]
    for name, position in CELL_POSITIONS.items():
        print(f"single cell, {name} position ({position}), layer {cell_layer}")
        runs = alternate(base + [f"layers=[{cell_layer}]", f"positions=[{position}]"], args.repeats)
        lines.append(row(f"one cell, layer {cell_layer}, {name} position (`{position}`)", runs))
    if not args.skip_sweep:
        sweep = base + ([f"layers=[{args.layers}]"] if args.layers else [])
        print("sweep:", " ".join(sweep))
        lines.append(row("sweep " + (" ".join(f"`{o}`" for o in sweep) or "(default grid)"), alternate(sweep, args.repeats)))
    table = "\n".join(lines)
    note = f"\n\n{platform.processor() or platform.machine()}, {_device()}; overrides: {' '.join(base) or 'none'}\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + note)
    print(table + note)


def _n_layers(overrides: list[str]) -> int:
    import das_cli
    from das_cli import config as C
    from das_cli.models import load_model

    cfg = C.typed(das_cli.compose(overrides))
    return load_model(cfg.model, "cpu", "float32").n_layers


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
