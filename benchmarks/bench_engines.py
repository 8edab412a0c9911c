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

With --whole-process (and --pyvene-python), the whole `das-cli` command over the sweep (default grid,
or --layers; --overrides and --epochs apply) is timed as a subprocess, from start to exit: model load,
base runs, source reads, training, evaluation, tables and heatmaps. Against it, one pyvene_peer.py
process trains and evaluates the same cells one after another (same pairs, batch orders, seeds and
hyperparameters), timed the same way: imports, model load and every cell. Exporting the cells is
timed by neither. The table (written to benchmarks/results_whole_process.md unless --out) gives both
wall clocks, their ratio, the mean IIA of each, the largest per-cell IIA gap and each peak RSS.

    python benchmarks/bench_engines.py --whole-process --pyvene-python .venv-pyvene/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
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
    from das_cli.activations import base_run
    from das_cli.models import load_model
    from das_cli.datasets import build_pairs

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
    from das_cli import grid

    cfg = C.typed(cfg)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    layers = tuple(grid.layers(cfg, lm.n_layers))
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


def export_cells(overrides: list[str], folder: Path) -> list[tuple[str, Path]]:
    """A CELL.pt per cell of the sweep `overrides` names: what pyvene_peer.py needs to train it exactly as
    das-cli does (the model loaded and the pairs built once). Returns (cell id, path) in the grid's order."""
    import torch

    import das_cli
    from das_cli import config as C
    from das_cli.data import batches, resolve_positions
    from das_cli.grid import expand_grid
    from das_cli.models import load_model
    from das_cli.datasets import build_pairs

    cfg = C.typed(das_cli.compose(overrides))
    lm = load_model(cfg.model, "cpu", "float32")
    pairs = build_pairs(cfg, lm)
    train, test = pairs["train"], pairs["test"]
    model_dir = _model_dir(cfg, lm, folder)
    exported = []
    for cell in expand_grid(cfg, lm):
        if cell.stream != "block_output" or len(cell.position) != 1 or cell.heads is not None:
            raise SystemExit(f"the pyvene peer trains block_output cells at one position; cell {cell.id} is not one")
        seed = cell.seed(int(cfg.seed))

        def groups(pairs, causes_only=False):
            """Per group, the tensors the peer reads; with `causes_only`, only the cause pairs (das-cli's `iia`
            counts those: isolate pairs, whose label is the base's own answer, are scored apart)."""
            assert all(g.labels.shape[1] == 1 for g in pairs.groups), "the pyvene peer scores one-token labels"
            out = []
            for g in pairs.groups:
                keep = torch.tensor([k == "cause" for k in g.kinds]) if causes_only and g.kinds else torch.ones(len(g), dtype=torch.bool)
                out.append({"base_ids": g.base_ids[keep], "source_ids": g.source_ids[keep], "labels": g.labels[keep, 0],
                            "base_pos": resolve_positions(g, cell.position, "base")[keep, 0],
                            "source_pos": resolve_positions(g, cell.position, "source")[keep, 0]})
            return [group for group in out if len(group["labels"])]

        generator = torch.Generator().manual_seed(seed)  # the order fit() draws for this cell (train.batch_plan)
        steps = [step for _ in range(int(cfg.train.epochs)) for step in batches(train.sizes, int(cfg.train.batch_size), generator)]
        path = folder / f"{cell.id}.pt"
        torch.save({"model_dir": model_dir, "layer": cell.layer, "dim": int(cfg.intervention.dim), "seed": seed,
                    "lr": float(cfg.train.lr), "lr_end_factor": float(cfg.train.lr_end_factor), "steps": steps,
                    "eval_batch": int(cfg.eval.batch_size), "train": groups(train), "test": groups(test, causes_only=True)}, path)
        exported.append((cell.id, path))
    return exported


def _model_dir(cfg, lm, folder: Path) -> str:
    """A folder or hub id the peer can load: the embedded model's converted checkpoint, a tiny random
    model saved next to the cells, or the config's own name."""
    from das_cli.models import _converted_embedded_dir

    if cfg.model.get("embedded"):
        return str(_converted_embedded_dir())
    if cfg.model.get("random_init"):
        lm.model.save_pretrained(folder / "model")
        lm.tokenizer.save_pretrained(folder / "model")
        return str(folder / "model")
    return str(cfg.model.get("name_or_path", cfg.model.name))


def measure_pyvene(overrides: list[str], python: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        (_, path), = export_cells(overrides, Path(folder))
        result = run_peer([path], python)
    return {"cell_seconds": result["seconds"], "cells": 1, "iia": [result["iia"]], "peak_rss_mb": result["peak_rss_mb"]}


def run_peer(paths: list[Path], python: str) -> dict:
    """One pyvene_peer.py process over `paths`: its JSON line, plus its wall clock and peak RSS seen from here."""
    peer = Path(__file__).with_name("pyvene_peer.py")
    done = timed([python, str(peer), *map(str, paths)])
    lines = [line for line in done["stdout"].splitlines() if line.startswith("RESULT ")]
    if done["returncode"] != 0 or not lines:
        raise SystemExit(f"pyvene peer failed ({len(paths)} cells):\n{done['stderr'][-2000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_seconds": done["wall_seconds"],
            "process_peak_rss_mb": done["peak_rss_mb"]}


def timed(command: list[str]) -> dict:
    """Run `command` to the end: its wall clock, its peak RSS (from the kernel's account of that child), output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"returncode": process.returncode, "wall_seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
                "stdout": out.read(), "stderr": err.read()}


def run_das_cli(overrides: list[str]) -> dict:
    """The `das-cli` command itself over the sweep: wall clock, peak RSS and each cell's IIA from its iia.csv."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "das_cli.cli", *overrides, "progress=false", f"hydra.run.dir={folder}"]
        done = timed(command)
        if done["returncode"] != 0:
            raise SystemExit(f"das-cli failed ({' '.join(overrides)}):\n{done['stderr'][-2000:]}")
        table = pd.read_csv(Path(folder) / "iia.csv")
    return {"wall_seconds": done["wall_seconds"], "peak_rss_mb": done["peak_rss_mb"],
            "iia": dict(zip(table["cell"], table["iia"]))}


def whole_process(sweep: list[str], python: str, repeats: int) -> str:
    """das-cli's whole run of the sweep against one pyvene process over the same cells; a Markdown table.
    Exporting the cells is timed by neither side; with repeats, each side's fastest run counts."""
    das, peer = [], []
    load_before = os.getloadavg()[0]  # other work on the machine slows both sides; the note shows it
    with tempfile.TemporaryDirectory() as folder:
        cells = export_cells(sweep, Path(folder))
        for _ in range(repeats):  # alternating, so drift in machine load hits both
            das.append(run_das_cli(sweep))
            print(f"  das-cli  {das[-1]['wall_seconds']:8.1f} s  {' '.join(sweep)}", flush=True)
            peer.append(run_peer([path for _, path in cells], python))
            print(f"  pyvene   {peer[-1]['wall_seconds']:8.1f} s  {len(cells)} cells", flush=True)
    ids = [cell_id for cell_id, _ in cells]
    if sorted(das[0]["iia"]) != sorted(ids):
        raise SystemExit(f"das-cli's cells {sorted(das[0]['iia'])} are not the exported cells {sorted(ids)}")
    das_iia = [das[0]["iia"][cell_id] for cell_id in ids]
    peer_iia = [cell["iia"] for cell in peer[0]["cells"]]
    das_s, peer_s = min(r["wall_seconds"] for r in das), min(r["wall_seconds"] for r in peer)
    return WHOLE_HEADER + (
        f"\n| sweep {' '.join(f'`{o}`' for o in sweep) or '(default grid)'} | {len(ids)} | {das_s:.1f} | {peer_s:.1f} | "
        f"**{peer_s / das_s:.1f}×** | {min(r['seconds'] for r in peer):.1f} | {_mean(das_iia):.3f} | {_mean(peer_iia):.3f} | "
        f"{max(abs(a - b) for a, b in zip(das_iia, peer_iia)):.3f} | {max(r['peak_rss_mb'] for r in das):.0f} | "
        f"{max(r['process_peak_rss_mb'] for r in peer):.0f} |"
        f"\n\nPer-cell test IIA, das-cli / pyvene: "
        + ", ".join(f"`{cell_id}` {a:.3f} / {b:.3f}" for cell_id, a, b in zip(ids, das_iia, peer_iia))
        + f". Load average (1 min) before the runs: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}."
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


WHOLE_HEADER = (
    "| measurement | cells | das-cli wall clock s | pyvene loop wall clock s | das-cli vs pyvene | pyvene s in training and evaluation | "
    "das-cli mean IIA | pyvene mean IIA | max abs per-cell IIA gap | das-cli peak RSS MB | pyvene peak RSS MB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def alternate(overrides: list[str], repeats: int, pyvene: str | None = None, engines: tuple[str, ...] = ENGINES) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    if pyvene:
        runs["pyvene"] = []
    for _ in range(repeats):
        for engine in runs:
            runs[engine].append(measure_pyvene(overrides, pyvene) if engine == "pyvene" else measure(overrides, engine))
            print(f"  {engine:9s} {runs[engine][-1]['cell_seconds']:8.1f} s  {' '.join(overrides)}", flush=True)
    return runs


def row(name: str, runs: dict[str, list[dict]]) -> str:
    """One table line; an engine left out (--engines) shows as a dash, and the IIA gap is then taken to the
    unbundled fast engine."""
    ran = [e for e in ENGINES if e in runs]
    seconds = {e: min(r["cell_seconds"] for r in runs[e]) / runs[e][0]["cells"] for e in ran}
    first = {e: runs[e][0] for e in ran}
    anchor = "reference" if "reference" in ran else "fast"
    iia_gap = max(abs(a - b) for e in ran if e != anchor for a, b in zip(first[e]["iia"], first[anchor]["iia"]))
    mean_iia = {e: sum(first[e]["iia"]) / len(first[e]["iia"]) for e in ran}
    mem = {e: max(r["peak_rss_mb"] for r in runs[e]) for e in ran}

    def ratio(a: str, b: str, bold: bool) -> str:
        if a not in seconds or b not in seconds:
            return "—"
        return f"**{seconds[b] / seconds[a]:.1f}×**" if bold else f"{seconds[b] / seconds[a]:.1f}×"

    def shown(values: dict, e: str, spec: str) -> str:
        return format(values[e], spec) if e in values else "—"

    line = (
        f"| {name} | {first['fast']['cells']} | {shown(seconds, 'bundled', '.2f')} | {shown(seconds, 'fast', '.2f')} | "
        f"{shown(seconds, 'reference', '.2f')} | {ratio('bundled', 'reference', True)} | {ratio('bundled', 'fast', True)} | "
        f"{ratio('fast', 'reference', False)} | {shown(mem, 'bundled', '.0f')} | {shown(mem, 'fast', '.0f')} | "
        f"{shown(mem, 'reference', '.0f')} | {first['fast']['cache_mb']:.0f} | {shown(mean_iia, 'bundled', '.3f')} | "
        f"{shown(mean_iia, 'fast', '.3f')} | {shown(mean_iia, 'reference', '.3f')} | {iia_gap:.3f} |"
    )
    if "pyvene" not in runs:
        return line
    peer = min(r["cell_seconds"] for r in runs["pyvene"])
    pv = runs["pyvene"][0]
    return line + f" {peer:.2f} | **{peer / seconds['bundled']:.1f}×** | {max(r['peak_rss_mb'] for r in runs['pyvene']):.0f} | {pv['iia'][0]:.3f} |"

HEADER = (
    "| measurement | cells | bundled s/cell | fast s/cell | reference s/cell | bundled vs reference | bundled vs fast | "
    "fast vs reference | bundled peak RSS MB | fast peak RSS MB | reference peak RSS MB | caches MB | "
    "bundled mean IIA | fast mean IIA | reference mean IIA | max abs IIA gap to reference (to fast where the reference is not run) |\n"
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
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated engines to time in the sweeps; bundled and fast always (e.g. leave the "
                        "reference out of the 90-cell wide sweep)")
    parser.add_argument("--out", default=None, help="Markdown table (default: benchmarks/results.md; "
                        "--whole-process: benchmarks/results_whole_process.md)")
    parser.add_argument("--pyvene-python", default=None, help="python of a virtualenv with pyvene (see pyvene_peer.py)")
    parser.add_argument("--whole-process", action="store_true",
                        help="time the das-cli command over the sweep against one pyvene process over its cells")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    base = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    if args.whole_process:
        if not args.pyvene_python:
            raise SystemExit("--whole-process needs --pyvene-python (the python of a virtualenv with pyvene)")
        sweep = base + ([f"layers=[{args.layers}]"] if args.layers else [])
        return write_table(whole_process(sweep, args.pyvene_python, args.repeats), base,
                           args.out or "benchmarks/results_whole_process.md")
    if unknown := set(args.engines.split(",")) - set(ENGINES):
        raise SystemExit(f"--engines: unknown engine {sorted(unknown)[0]!r}; valid choices: {', '.join(ENGINES)}")
    engines = tuple(e for e in ENGINES if e in args.engines.split(",") or e != "reference")
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
        runs = alternate(sweep, args.repeats, engines=engines)
        lines.append(row("sweep " + (" ".join(f"`{o}`" for o in sweep) or "(default grid)"), runs) + peer_gap)
    write_table("\n".join(lines), base, args.out or "benchmarks/results.md")


def write_table(table: str, overrides: list[str], out: str) -> None:
    note = f"\n\n{platform.processor() or platform.machine()}, {_device()}; overrides: {' '.join(overrides) or 'none'}\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(table + note)
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
