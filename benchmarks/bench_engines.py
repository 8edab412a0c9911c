"""Bundled vs fast vs reference engine: seconds per cell, speed-ups, peak memory and IIA, side by side.

`bundled` is the fast engine training `train.cells_per_step=auto` cells per step, `fast` the same engine
one cell at a time (`train.cells_per_step=1`), `reference` a full forward with a hook per step.

Every measurement runs in a fresh subprocess (so peak memory is that engine's alone), and the
engines alternate (fast, reference, fast, reference...) so drift in machine load hits both.

    python benchmarks/bench_engines.py                       # default model and grid
    python benchmarks/bench_engines.py --epochs 1 --layers 4,16,28 --repeats 1
    python benchmarks/bench_engines.py --overrides model=gpt2 device=cuda

Single cells: block_output at the middle layer, at an early (`name1`), a middle (`s2`) and the last
position. Sweeps (--sweeps): `default` the default grid (or --layers), `wide` every layer at `s2`, `io`
and `last`, `seeds` five seeds of the last position at the middle layer; each run through `das_cli.run`. Writes a Markdown table
to --out and prints it.

With --pyvene-python (the python of a virtualenv holding pyvene, see pyvene_peer.py), every single
cell is also trained by pyvene on the same pairs, in the same batch order, with the same
hyperparameters and seed; the table then adds pyvene's seconds per cell, IIA and peak memory.
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

VARIANTS = {  # name -> overrides
    "bundled": ["train.engine=fast", "train.cells_per_step=auto"],
    "fast": ["train.engine=fast", "train.cells_per_step=1"],
    "reference": ["train.engine=reference"],
}
ENGINES = tuple(VARIANTS)
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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        table = das_cli.run(cfg, folder)
        seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()  # before the cache is sized below, which loads the model again
    result = {
        "seconds": seconds,
        "cell_seconds": float(table["seconds"].sum()),
        "cells": len(table),
        "iia": table["iia"].round(4).tolist(),
        "loss": table["loss"].round(5).tolist(),
        "peak_rss_mb": peak_mb,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    result["cache_mb"] = _cache_mb(cfg, load_model, build_pairs, base_run) if args.engine_name == "fast" else 0.0
    print("RESULT " + json.dumps(result))


def _cache_mb(cfg, load_model, build_pairs, base_run) -> float:
    """Bytes the fast engine keeps: base keys/values and residuals of the swept layers."""
    from das_cli import config as C

    cfg = C.typed(cfg)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    layers = tuple(C.layers(cfg, lm.n_layers))
    total = 0
    for pairs in build_pairs(cfg, lm).values():
        run = base_run(lm, pairs, int(cfg.eval.batch_size), True, layers)
        for group_prefix, group_residuals in zip(run.prefixes, run.residuals):
            total += sum(k.nbytes + v.nbytes for k, v in filter(None, group_prefix))
            total += sum(r.nbytes for r in group_residuals.values())
    return total / 2**20


def measure(overrides: list[str], engine: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--engine-name", engine, "--overrides", *overrides, *VARIANTS[engine]]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker failed ({' '.join(overrides)}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def export_cell(overrides: list[str], path: Path) -> None:
    """Everything pyvene_peer.py needs to train the one cell `overrides` names exactly as das-cli does."""
    import torch

    import das_cli
    from das_cli import config as C
    from das_cli.data import batches, resolve_positions
    from das_cli.models import _converted_embedded_dir, load_model
    from das_cli.grid import expand_grid
    from das_cli.sweep import build_pairs

    cfg = C.typed(das_cli.compose(overrides))
    lm = load_model(cfg.model, "cpu", "float32")
    (cell,) = expand_grid(cfg, lm)
    seed = cell.seed(int(cfg.seed))
    pairs = build_pairs(cfg, lm)
    train, test = pairs["train"], pairs["test"]

    def groups(pairs):
        assert all(g.labels.shape[1] == 1 for g in pairs.groups), "the pyvene peer scores one-token labels"
        return [{"base_ids": g.base_ids, "source_ids": g.source_ids, "labels": g.labels[:, 0],
                 "base_pos": resolve_positions(g, cell.position, "base")[:, 0],
                 "source_pos": resolve_positions(g, cell.position, "source")[:, 0]} for g in pairs.groups]

    generator = torch.Generator().manual_seed(seed)  # the order fit() draws for this cell
    steps = [step for _ in range(int(cfg.train.epochs)) for step in batches(train.sizes, int(cfg.train.batch_size), generator)]
    model_dir = str(_converted_embedded_dir()) if cfg.model.get("embedded") else str(cfg.model.get("name_or_path", cfg.model.name))
    torch.save({"model_dir": model_dir, "layer": cell.layer, "dim": int(cfg.intervention.dim), "seed": seed,
                "lr": float(cfg.train.lr), "lr_end_factor": float(cfg.train.lr_end_factor), "steps": steps,
                "eval_batch": int(cfg.eval.batch_size), "train": groups(train), "test": groups(test)}, path)


def measure_pyvene(overrides: list[str], python: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cell.pt"
        export_cell(overrides, path)
        peer = Path(__file__).with_name("pyvene_peer.py")
        out = subprocess.run([python, str(peer), str(path)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"pyvene peer failed ({' '.join(overrides)}):\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {"cell_seconds": result["seconds"], "cells": 1, "iia": [result["iia"]], "peak_rss_mb": result["peak_rss_mb"]}


def alternate(overrides: list[str], repeats: int, pyvene: str | None = None) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    if pyvene:
        runs["pyvene"] = []
    for _ in range(repeats):
        for engine in runs:
            runs[engine].append(measure_pyvene(overrides, pyvene) if engine == "pyvene" else measure(overrides, engine))
            print(f"  {engine:9s} {runs[engine][-1]['cell_seconds']:8.1f} s  {' '.join(overrides)}", flush=True)
    return runs


def row(name: str, runs: dict[str, list[dict]]) -> str:
    seconds = {e: min(r["cell_seconds"] for r in runs[e]) / runs[e][0]["cells"] for e in ENGINES}
    first = {e: runs[e][0] for e in ENGINES}
    iia_gap = max(abs(a - b) for e in ("bundled", "fast") for a, b in zip(first[e]["iia"], first["reference"]["iia"]))
    mean_iia = {e: sum(first[e]["iia"]) / len(first[e]["iia"]) for e in ENGINES}
    mem = {e: max(r["peak_rss_mb"] for r in runs[e]) for e in ENGINES}
    bundled, fast, ref = (seconds[e] for e in ENGINES)
    line = (
        f"| {name} | {first['fast']['cells']} | {bundled:.2f} | {fast:.2f} | {ref:.2f} | **{ref / bundled:.1f}×** | "
        f"**{fast / bundled:.1f}×** | {ref / fast:.1f}× | {mem['bundled']:.0f} | {mem['fast']:.0f} | {mem['reference']:.0f} | "
        f"{first['fast']['cache_mb']:.0f} | {mean_iia['bundled']:.3f} | {mean_iia['fast']:.3f} | {mean_iia['reference']:.3f} | {iia_gap:.3f} |"
    )
    if "pyvene" not in runs:
        return line
    peer = min(r["cell_seconds"] for r in runs["pyvene"])
    pv = runs["pyvene"][0]
    return line + f" {peer:.2f} | **{peer / bundled:.1f}×** | {max(r['peak_rss_mb'] for r in runs['pyvene']):.0f} | {pv['iia'][0]:.3f} |"


HEADER = (
    "| measurement | cells | bundled s/cell | fast s/cell | reference s/cell | bundled vs reference | bundled vs fast | "
    "fast vs reference | bundled peak RSS MB | fast peak RSS MB | reference peak RSS MB | caches MB | "
    "bundled mean IIA | fast mean IIA | reference mean IIA | max abs IIA gap to reference |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
PEER_HEADER = (" pyvene s/cell | bundled vs pyvene | pyvene peak RSS MB | pyvene IIA |", "---|---|---|---|")


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
    parser.add_argument("--sweeps", default="default", help="comma-separated: default, wide, seeds")
    parser.add_argument("--skip-cells", action="store_true", help="time the sweep only")
    parser.add_argument("--out", default="benchmarks/results.md")
    parser.add_argument("--pyvene-python", default=None, help="python of a virtualenv with pyvene (see pyvene_peer.py)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    base = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    n_layers = _n_layers(base)
    cell_layer = args.cell_layer if args.cell_layer is not None else n_layers // 2
    header = HEADER
    if args.pyvene_python:
        top, rule = HEADER.split("\n")
        header = f"{top}{PEER_HEADER[0]}\n{rule}{PEER_HEADER[1]}"
    lines = [header]
    for name, position in ({} if args.skip_cells else CELL_POSITIONS).items():
        print(f"single cell, {name} position ({position}), layer {cell_layer}")
        runs = alternate(base + [f"layers=[{cell_layer}]", f"positions=[{position}]"], args.repeats, args.pyvene_python)
        lines.append(row(f"one cell, layer {cell_layer}, {name} position (`{position}`)", runs))
    sweeps = {
        "default": [f"layers=[{args.layers}]"] if args.layers else [],
        "wide": ["layers=all", "positions=[s2,io,last]"],
        "seeds": [f"layers=[{cell_layer}]", "positions=[last]", "seeds=5"],
    }
    for name in [] if args.skip_sweep else args.sweeps.split(","):
        if name not in sweeps:
            raise SystemExit(f"--sweeps: unknown sweep {name!r}; valid choices: {', '.join(sweeps)}")
        sweep = base + sweeps[name]
        print("sweep:", " ".join(sweep))
        peer_gap = " — | — | — | — |" if args.pyvene_python else ""  # pyvene runs single cells only
        lines.append(row("sweep " + (" ".join(f"`{o}`" for o in sweep) or "(default grid)"), alternate(sweep, args.repeats)) + peer_gap)
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
