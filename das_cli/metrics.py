"""The tallies of an evaluation: per kind of pair and counterfactual type, how often the intervened model gives
the label (IIA), with the label's probability, the logit difference and the loss; the scores read off them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data import Batch, answer_matrix, batches, to_device
from .engines import Engine
from .examples import counterfactual_suffix
from .readout import answer_cross_entropy
from .scores import mean_proportion_interval, wilson_interval


Tally = dict[str, list[int]]  # counterfactual type ("" when none is given) -> [hits, pairs]


@dataclass
class Evaluation:
    """Accuracy of the intervened model against the pairs' labels, per kind of pair: a pair is a hit when
    every label token is the top-1 token at its position, the label teacher-forced (what greedy decoding
    of the label's length would produce)."""

    hits: dict[str, int]
    counts: dict[str, int]
    loss: float  # mean CE over all pairs (each pair's: the mean over its label's tokens)
    label_probability: dict[str, float] = field(default_factory=dict)  # per kind: sum over pairs of p(label), a product over its tokens
    logit_diff: dict[str, float] = field(default_factory=dict)  # per kind: sum of logit(label) − logit(base's answer), first tokens
    logit_diff_counts: dict[str, int] = field(default_factory=dict)  # ... over pairs whose base answer is known and whose first token differs
    types: dict[str, Tally] = field(default_factory=dict)  # per kind: hits and pairs per counterfactual type
    base_correct: dict[str, Tally] | None = None  # the same over the pairs whose unedited base answer is right (None: not asked)

    def iia(self, kind: str | None = None) -> float:
        """IIA over the pairs of one kind, or over all pairs (NaN when there are none)."""
        kinds = [kind] if kind else list(self.counts)
        n = sum(self.counts.get(k, 0) for k in kinds)
        return sum(self.hits.get(k, 0) for k in kinds) / n if n else math.nan

    def main_kinds(self) -> list[str]:
        """The kinds `iia` counts: cause pairs, or every pair when there are none."""
        return ["cause"] if "cause" in self.counts else list(self.counts)

    def type_tally(self) -> Tally:
        """Hits and pairs per counterfactual type over the pairs `iia` counts."""
        kinds = self.main_kinds()
        tally = _merged(self.types, kinds)
        return tally or {"": [sum(self.hits.get(k, 0) for k in kinds), sum(self.counts.get(k, 0) for k in kinds)]}

    def scores(self) -> dict[str, float]:
        """`iia`: cause pairs (all pairs if there are none), the mean over counterfactual types of each type's
        IIA (MIB's score; with one type or none, the IIA of all those pairs); with named types, each type's
        `iia_cf_<type>` and pair count `n_cf_<type>`. With isolate pairs too, RAVEL's scores: `iia_cause`
        (= `iia`), `iia_isolate` (every isolate pair) and `iia_mean` (their mean, "disentangle"). With
        `base_correct`: `iia_base_correct`, the same mean over the pairs whose base answer is right, and
        their count `n_base_correct`."""
        tally = self.type_tally()
        main = _mean_over_types(tally)
        out: dict[str, float] = {"iia": main}
        if set(tally) != {""}:
            for name, (hits, n) in sorted(tally.items()):
                suffix = counterfactual_suffix(name)
                out[f"iia_cf_{suffix}"], out[f"n_cf_{suffix}"] = hits / n, n
        if len(self.counts) >= 2:
            per_kind = {f"iia_{k}": main if k == "cause" else self.iia(k)
                        for k in sorted(self.counts, key=lambda k: (k != "cause", k))}
            out.update(per_kind, iia_mean=sum(per_kind.values()) / len(per_kind))
        if self.base_correct is not None:
            kept = _merged(self.base_correct, self.main_kinds())
            out["iia_base_correct"] = _mean_over_types(kept)
            out["n_base_correct"] = sum(n for _, n in kept.values())
        return out

    def graded_scores(self) -> dict[str, float]:
        """On the pairs `iia` counts: its 95% interval (`iia_lo`, `iia_hi`: Wilson's over the pairs with one
        counterfactual type, else `scores.mean_proportion_interval`, the interval of the mean over types),
        the mean probability of the label (`p_label`; several tokens: the product of their teacher-forced
        probabilities), and the mean logit of the label's first token minus that of the base answer's
        first token (`logit_diff`, over pairs whose base answer is known and starts with another token
        than the label; NaN if none). `p_label` and `logit_diff` pool the pairs of every type."""
        kinds = self.main_kinds()
        n = sum(self.counts.get(k, 0) for k in kinds)
        tally = self.type_tally()
        if len(tally) > 1:
            lo, hi = mean_proportion_interval([(hits, count) for hits, count in tally.values()])
        else:
            lo, hi = wilson_interval(sum(self.hits.get(k, 0) for k in kinds), n)
        known = sum(self.logit_diff_counts.get(k, 0) for k in kinds)
        return {
            "iia_lo": lo, "iia_hi": hi,
            "p_label": sum(self.label_probability.get(k, 0.0) for k in kinds) / n if n else math.nan,
            "logit_diff": sum(self.logit_diff.get(k, 0.0) for k in kinds) / known if known else math.nan,
        }


def _merged(tallies: dict[str, Tally], kinds: list[str]) -> Tally:
    """The kinds' tallies added up per counterfactual type."""
    out: Tally = {}
    for kind in kinds:
        for name, (hits, n) in tallies.get(kind, {}).items():
            total = out.setdefault(name, [0, 0])
            total[0], total[1] = total[0] + hits, total[1] + n
    return out


def _mean_over_types(tally: Tally) -> float:
    """The mean over types (with pairs) of each type's IIA; NaN when no type has pairs."""
    shares = [hits / n for hits, n in tally.values() if n]
    return sum(shares) / len(shares) if shares else math.nan


@torch.no_grad()
def evaluate_kinds(engine: Engine, intervention, batch_size: int, base_labels: list[Tensor] | None = None,
                   base_correct: list[Tensor] | None = None) -> Evaluation:
    """Per kind of pair (and per counterfactual type): how often every label token is the intervened model's
    top-1 token (teacher-forced), the label's probability and, where `base_labels` (per group, [G, K'] token
    ids, -1 unknown) gives the base's own answer, the first label token's logit minus the first answer token's.
    `base_correct` (per group, [G] bool: the unedited model answers the base prompt right) adds the tallies
    over those pairs (Evaluation.base_correct).

    An engine gives logits [B, K, vocab] and labels [B, K] (-1 past a shorter label's end); [B, vocab]
    and [B] mean one token per pair."""
    tally = EvaluationTally(engine, base_labels, base_correct)
    for batch in evaluation_batches(engine, batch_size):
        tally.add(batch, engine.logits(batch, intervention))
    return tally.result()


def evaluation_batches(engine: Engine, batch_size: int) -> list[Batch]:
    """The evaluation's batches: every pair once, in order (the same for every cell over these pairs)."""
    return to_device(batches([len(group) for group in engine.groups], batch_size), engine.lm.device)


class EvaluationTally:
    """`evaluate_kinds`'s running totals over one engine's pairs, fed the logits of one batch at a time."""

    def __init__(self, engine: Engine, base_labels: list[Tensor] | None = None, base_correct: list[Tensor] | None = None):
        self.engine, self.base_correct = engine, base_correct
        self.evaluation = Evaluation({}, {}, 0.0, base_correct={} if base_correct is not None else None)
        self.known = [answer_matrix(labels)[:, 0].to(engine.lm.device) for labels in base_labels] if base_labels else None
        self.loss_sum, self.n = 0.0, 0

    def add(self, batch: Batch, logits: Tensor) -> None:
        engine, result, base_correct = self.engine, self.evaluation, self.base_correct
        labels = answer_matrix(engine.labels(batch))
        logits = logits[:, None] if logits.dim() == 2 else logits
        given, targets = labels >= 0, labels.clamp_min(0)
        right = ((logits.argmax(-1) == labels) | ~given).all(dim=1)
        token_log_p = torch.log_softmax(logits, dim=-1).gather(2, targets[..., None])[..., 0]
        probability = (token_log_p * given).sum(dim=1).exp()
        first = logits[:, 0]
        chosen = first.gather(1, targets[:, :1])[:, 0]
        if self.known:
            base = torch.cat([self.known[g][rows] for g, rows in batch])
            differs = (base >= 0) & (base != labels[:, 0])
            diff = chosen - first.gather(1, base.clamp_min(0)[:, None])[:, 0]
        else:
            differs, diff = torch.zeros_like(right), torch.zeros_like(chosen)
        pairs = [(engine.groups[g], g, i) for g, rows in batch for i in rows.tolist()]
        kinds = [group.kinds[i] if group.kinds else "cause" for group, _, i in pairs]
        types = [group.counterfactuals[i] if getattr(group, "counterfactuals", None) else "" for group, _, i in pairs]
        base_right = [bool(base_correct[g][i]) if base_correct is not None else False for _, g, i in pairs]
        rows = zip(kinds, types, base_right, right.tolist(), probability.tolist(), diff.tolist(), differs.tolist())
        for kind, name, base_ok, ok, p, d, counted in rows:
            _add(result.hits, kind, int(ok))
            _add(result.counts, kind, 1)
            _tally(result.types, kind, name, int(ok))
            if base_ok:
                _tally(result.base_correct, kind, name, int(ok))
            _add(result.label_probability, kind, p)
            if counted:
                _add(result.logit_diff, kind, d)
                _add(result.logit_diff_counts, kind, 1)
        self.loss_sum += float(answer_cross_entropy(logits, labels, reduction="sum"))
        self.n += len(labels)

    def result(self) -> Evaluation:
        self.evaluation.loss = self.loss_sum / max(self.n, 1)
        return self.evaluation


def _tally(tallies: dict[str, Tally], kind: str, name: str, hit: int) -> None:
    total = tallies.setdefault(kind, {}).setdefault(name, [0, 0])
    total[0], total[1] = total[0] + hit, total[1] + 1


def _add(totals: dict, key: str, value) -> None:
    totals[key] = totals.get(key, 0) + value


def evaluate(engine: Engine, intervention, batch_size: int) -> tuple[float, float]:
    """(IIA over all pairs, mean CE): every label token is the intervened model's top-1 (teacher-forced)."""
    result = evaluate_kinds(engine, intervention, batch_size)
    return result.iia(), result.loss
