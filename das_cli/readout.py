"""The unembedding at the answer positions: final hidden state -> logits, or straight to the training loss.

A one-token step of the fast engine spends more time in the vocabulary projection than in the
blocks before it: on CPU, with a step's few rows, reading the [vocab, hidden] weight is the cost,
and a plain step reads it twice (logits forward, gradient backward). `one_pass_cross_entropy` reads
it once: per vocabulary chunk it updates the running max, the softmax normaliser and the
softmax-weighted sum of weight rows (an online softmax, as in FlashAttention, Dao et al. 2022).
That sum is the loss's gradient with respect to the hidden state, kept for the backward pass.

An answer of K tokens is read at K positions; its loss is the mean cross-entropy over its tokens,
and a batch's loss the mean over pairs (`answer_cross_entropy`), so a long answer weighs as much as a short one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import LoadedModel

CHUNK_ROWS = 2048  # vocabulary rows per chunk: 4.7 MB of float32 weight at hidden size 576


class Readout:
    """What the causal-LM head does to the final hidden state, for float32 logits at the answer positions."""

    def __init__(self, lm: LoadedModel):
        self.head = lm.model.get_output_embeddings()
        self.softcap = getattr(lm.model.config, "final_logit_softcapping", None)  # Gemma 2
        weight = self.head.weight
        # On GPU a plain projection is one fast kernel; chunking would only add launches.
        self.one_pass = (
            weight.device.type == "cpu" and weight.dtype == torch.float32
            and getattr(self.head, "bias", None) is None and self.softcap is None
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., hidden] -> [..., vocab] float32, as the model's own forward computes them."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """`answer_cross_entropy` of the logits of `hidden` [B, K, hidden] (or [B, hidden]) against `labels` [B, K] (or [B])."""
        if hidden.dim() == 2:
            hidden, labels = hidden[:, None], labels[:, None]
        if self.one_pass:
            weights = answer_weights(labels)
            rows = hidden.shape[0] * hidden.shape[1]
            return one_pass_cross_entropy(hidden.reshape(rows, -1), self.head.weight, labels.clamp_min(0).reshape(rows), weights=weights.reshape(rows))
        return answer_cross_entropy(self.logits(hidden), labels)


    def losses(self, hidden: list[Tensor], labels: list[Tensor]) -> Tensor:
        """[cells]: each cell's `loss` of its own rows, computed together (a bundle's step: the vocabulary weight
        is read once for every cell's rows); each cell's rows weigh 1 / its own number of pairs."""
        hidden = [h[:, None] if h.dim() == 2 else h for h in hidden]
        labels = [l[:, None] if l.dim() == 1 else l for l in labels]
        if not self.one_pass:
            return torch.stack([answer_cross_entropy(self.logits(h), l) for h, l in zip(hidden, labels)])
        rows = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])
        targets = torch.cat([l.clamp_min(0).reshape(-1) for l in labels])
        weights = torch.cat([answer_weights(l).reshape(-1) for l in labels])
        per_row = _OnePassRowLosses.apply(rows, self.head.weight, targets, CHUNK_ROWS, weights)
        return torch.stack([part.sum() for part in per_row.split([l.numel() for l in labels])])


def answer_weights(labels: Tensor) -> Tensor:
    """[B, K] weight of each answer position in the loss: 1 / (B x the pair's answer length); 0 past its end."""
    given = (labels >= 0).to(torch.float32)
    return given / given.sum(dim=1, keepdim=True) / labels.shape[0]


def answer_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits [B, K, vocab] against answers [B, K] (-1 past a shorter answer's end): the mean
    over each answer's tokens, then the mean over pairs (`reduction="sum"`: their sum)."""
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")  # [B, K]
    per_pair = (per_token * answer_weights(labels)).sum(dim=1) * labels.shape[0]
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def one_pass_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = CHUNK_ROWS, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, differentiable in `hidden` only: the mean over
    rows, or the sum of each row's weighted by `weights` [rows]."""
    if weights is None:
        weights = hidden.new_full((hidden.shape[0],), 1.0 / hidden.shape[0])
    return _OnePassCrossEntropy.apply(hidden, weight, labels, chunk, weights)


class _OnePassCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, weights: Tensor) -> Tensor:
        loss, grad = _loss_and_gradient(hidden, weight, labels, chunk, weights)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None


class _OnePassRowLosses(torch.autograd.Function):
    """Each row's weighted loss [rows] (their sum is `_OnePassCrossEntropy`'s loss)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, weights: Tensor) -> Tensor:
        per_row, grad = _loss_and_gradient(hidden, weight, labels, chunk, weights, per_row=True)
        ctx.save_for_backward(grad)
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_rows[:, None] * grad, None, None, None, None


def _loss_and_gradient(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, weights: Tensor,
                       per_row: bool = False) -> tuple[Tensor, Tensor]:
    """loss = sum_i w_i (logsumexp(l_i) - l_i[y_i]) (`per_row`: its terms); d loss / d hidden_i = w_i (softmax(l_i) @ weight - weight[y_i])."""
    rows = hidden.shape[0]
    running_max = hidden.new_full((rows,), -torch.inf)
    normaliser = hidden.new_zeros(rows)
    weighted = hidden.new_zeros(hidden.shape)  # sum_v exp(l_v - running_max) * weight[v]
    for first in range(0, weight.shape[0], chunk):
        part = weight[first : first + chunk]
        logits = hidden @ part.T
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        rescale = torch.exp(running_max - new_max)
        scores = torch.exp(logits - new_max[:, None])
        normaliser = normaliser * rescale + scores.sum(dim=1)
        weighted = weighted * rescale[:, None] + scores @ part
        running_max = new_max
    target_rows = weight[labels]
    target_logits = (hidden * target_rows).sum(dim=1)
    terms = (running_max + normaliser.log() - target_logits) * weights
    loss = terms if per_row else terms.sum()
    grad = (weighted / normaliser[:, None] - target_rows) * weights[:, None]
    return loss, grad
