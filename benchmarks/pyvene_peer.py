"""The same DAS cell trained with pyvene, the field's reference library, for the engine benchmark.

Runs in its own virtualenv (pyvene 0.1.x needs transformers 4.x; das-cli needs 5.x):

    python -m venv .venv-pyvene
    .venv-pyvene/bin/pip install torch==2.13.0 pyvene==0.1.8 "transformers<5"
    .venv-pyvene/bin/python benchmarks/pyvene_peer.py CELL.pt [CELL.pt ...]

CELL.pt is written by bench_engines.py: the model folder, the cell's layer, the token ids and
positions of every pair, the batch order of every training step (the order das-cli's own run of
the cell uses), the cell seed and the hyperparameters. The intervention is pyvene's
LowRankRotatedSpaceIntervention on block_output, trained with Adam and the same linear decay on
the cross-entropy of the last position's logits.

Several CELL.pt files (a sweep's cells, one model) make a researcher's pyvene loop: one process loads
the model once and trains and evaluates the cells one after another. Prints one JSON line: `seconds`
(training and evaluation, summed over the cells), `iia` (the mean over the cells; one file: its IIA),
`peak_rss_mb`, `total_seconds` (the whole process from the top of this file: imports, model load,
every cell) and `cells` (each cell's layer, seconds and IIA).
"""

import time

STARTED = time.perf_counter()  # before the imports: total_seconds counts them

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pyvene as pv  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def load_model(name_or_folder: str):
    """A hub model, or a checkpoint folder saved by transformers 5 (rope settings moved) read by transformers 4."""
    config_file = Path(name_or_folder) / "config.json"
    config = None
    if config_file.exists():
        values = json.loads(config_file.read_text())
        rope = values.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_pretrained(name_or_folder, config=config, torch_dtype=torch.float32)
    return model.eval().requires_grad_(False)


def locations(positions: torch.Tensor) -> list:
    """pyvene's unit locations for one intervention: [batch][positions]."""
    return [[[int(p)] for p in positions.tolist()]]


def logits(intervenable, group: dict, rows: torch.Tensor) -> torch.Tensor:
    base, source = group["base_ids"][rows], group["source_ids"][rows]
    where = {"sources->base": (locations(group["source_pos"][rows]), locations(group["base_pos"][rows]))}
    _, out = intervenable({"input_ids": base}, [{"input_ids": source}], where)
    return out.logits[:, -1].float()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_and_test(model, cell: dict) -> dict:
    """Train one cell's intervention on the frozen model and return its seconds and test IIA."""
    torch.manual_seed(cell["seed"])
    config = pv.IntervenableConfig(
        representations=[{"layer": cell["layer"], "component": "block_output", "unit": "pos",
                          "low_rank_dimension": cell["dim"]}],
        intervention_types=pv.LowRankRotatedSpaceIntervention,
    )
    intervenable = pv.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    start = time.perf_counter()
    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=cell["lr"])
    total = max(1, len(cell["steps"]))
    decay = cell["lr_end_factor"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 + (decay - 1) * min(s / total, 1.0))
    for batch in cell["steps"]:  # a batch's pieces: rows of groups of different prompt lengths
        pieces = [(cell["train"][g], rows) for g, rows in batch]
        batch_logits = torch.cat([logits(intervenable, group, rows) for group, rows in pieces])
        loss = F.cross_entropy(batch_logits, torch.cat([group["labels"][rows] for group, rows in pieces]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    correct = n = 0
    with torch.no_grad():
        for group in cell["test"]:
            for i in range(0, len(group["labels"]), cell["eval_batch"]):
                rows = torch.arange(i, min(i + cell["eval_batch"], len(group["labels"])))
                correct += int((logits(intervenable, group, rows).argmax(-1) == group["labels"][rows]).sum())
                n += len(rows)
    return {"layer": cell["layer"], "seconds": time.perf_counter() - start, "iia": correct / max(n, 1)}


def main(paths: list[str]) -> None:
    cells = [torch.load(path, weights_only=False) for path in paths]
    folders = {cell["model_dir"] for cell in cells}
    if len(folders) != 1:
        raise SystemExit(f"pyvene_peer: the cells name {len(folders)} models ({', '.join(sorted(folders))}); give one model's cells")
    model = load_model(folders.pop())
    results = [train_and_test(model, cell) for cell in cells]
    print("RESULT " + json.dumps({
        "seconds": sum(r["seconds"] for r in results),
        "iia": sum(r["iia"] for r in results) / len(results),
        "peak_rss_mb": peak_rss_mb(),
        "total_seconds": time.perf_counter() - STARTED,
        "cells": results,
    }))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: pyvene_peer.py CELL.pt [CELL.pt ...]")
    main(sys.argv[1:])
