"""The full sweep against successive halving, and against the prescan's cut followed by halving, in one run.

    python benchmarks/bench_search.py --out benchmarks/results_search.md -- layers=all 'positions=[s2,io,last]'

Runs `das-cli` three times into folders under --work (each a whole process, timed with its peak memory):
  full     every cell for the whole schedule, with search.prescan=true (its scores change no cell)
  halving  search=halving (eta 3, min_epochs 1 unless overridden)
  cut      search=halving search.prescan=true search.prescan_keep=<--keep>
and writes a Markdown report: wall clock and the ratios, peak memory, the cells each rung trained, whether the full
sweep's three best cells by validation IIA survive (with the same test IIA) and rank in the prescan's top ten, and
the prescan's Spearman correlation with test IIA over every cell of the full sweep. `--full FOLDER` reuses a full
sweep already run (its wall clock then comes from another run: the report says so).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from das_cli.results import spearman  # noqa: E402


def timed(args: list[str], folder: Path, log: Path) -> tuple[float, float | None]:
    """(wall seconds, peak resident MiB) of one das-cli run into `folder`."""
    command = [sys.executable, "-m", "das_cli.cli", *args, "progress=false", f"hydra.run.dir={folder}"]
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():
        command = [str(gnu_time), "-f", "peak_kib %M", *command]
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"das-cli {' '.join(args)} failed ({done.returncode}); see {log}")
    peak = re.findall(r"peak_kib (\d+)", log.read_text())
    return seconds, (int(peak[-1]) / 1024 if peak else None)


def rung_counts(folder: Path, total: int) -> str:
    table = pd.read_csv(folder / "halving.csv")
    per_rung = table.groupby("rung")["cell"].count().tolist()
    final = int(table[table["rung"] == table["rung"].max()]["kept"].sum())
    return f"{total} in the grid; trained per rung: {' → '.join(map(str, per_rung + [final]))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_search"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_search.md"))
    parser.add_argument("--keep", type=float, default=0.34, help="search.prescan_keep of the third run")
    parser.add_argument("--full", type=Path, default=None, help="a full sweep (with search.prescan=true) to reuse")
    parser.add_argument("overrides", nargs="*", help="das-cli overrides shared by every run (after --)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shared = [o for o in args.overrides if not o.startswith("search.")] + ["output.plots=false"]
    searched = [o for o in args.overrides if o.startswith("search.")]  # search.eta=..., for the halving runs only
    runs = {"halving": ["search=halving", *searched],
            "cut": ["search=halving", *searched, "search.prescan=true", f"search.prescan_keep={args.keep}"]}
    measured = {}
    full = args.full or args.work / "full"
    if args.full is None:
        measured["full"] = timed(shared + ["search.prescan=true"], full, args.work / "full.log")
    for name, extra in runs.items():
        measured[name] = timed(shared + extra, args.work / name, args.work / f"{name}.log")

    whole = pd.read_csv(full / "iia.csv").set_index("cell")
    prescan = pd.read_csv(full / "prescan.csv").set_index("cell")["prescan"]
    best = whole["iia_val"].sort_values(ascending=False, kind="stable").index[:3]
    top10 = set(prescan.sort_values(ascending=False, kind="stable").index[:10])
    lines = [f"# Search strategies: `{' '.join(args.overrides)}`", "",
             f"{len(whole)} cells; das-cli {' '.join(shared)}; halving runs add `search=halving {' '.join(searched)}`, "
             f"the cut run `search.prescan=true search.prescan_keep={args.keep}`; same machine, one after another.", "",
             "| run | wall clock (s) | vs full | peak memory (MiB) | cells trained |", "|---|---|---|---|---|"]
    base = measured.get("full", (None, None))[0]
    for name in ("full", "halving", "cut"):
        seconds, peak = measured.get(name, (None, None))
        ratio = f"{base / seconds:.1f}× faster" if base and seconds and name != "full" else ("1.0" if seconds else "not run here")
        trained = f"{len(whole)}" if name == "full" else rung_counts(args.work / name, len(whole))
        lines.append(f"| {name} | {'—' if seconds is None else f'{seconds:.0f}'} | {ratio} | "
                     f"{'—' if peak is None else f'{peak:.0f}'} | {trained} |")
    if args.full is not None:
        lines += ["", f"The full sweep is {args.full}, run before this benchmark: its wall clock is not compared."]
    lines += ["", "The full sweep's three best cells by validation IIA:", "",
              "| cell | iia_val | test IIA (full) | prescan rank | " + " | ".join(f"{n}: test IIA" for n in runs) + " |",
              "|---|---|---|---|" + "---|" * len(runs)]
    ranks = prescan.rank(ascending=False, method="min")
    for cell in best:
        row = [cell, f"{whole.loc[cell, 'iia_val']:.2f}", f"{whole.loc[cell, 'iia']:.4f}", f"{int(ranks[cell])}"]
        for name in runs:
            other = pd.read_csv(args.work / name / "iia.csv").set_index("cell")
            kept = pd.isna(other.loc[cell].get("stopped"))
            same = kept and other.loc[cell, "iia"] == whole.loc[cell, "iia"]
            row.append(f"{other.loc[cell, 'iia']:.4f} ({'survived, same bits' if same else 'survived, differs' if kept else 'stopped'})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"In the prescan's top 10: {sum(c in top10 for c in best)} of 3.",
              f"Spearman correlation of the prescan with test IIA over all {len(whole)} cells: "
              f"{spearman(prescan.reindex(whole.index), whole['iia']):.2f} (with validation IIA "
              f"{spearman(prescan.reindex(whole.index), whole['iia_val']):.2f})."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
