"""The unembedding at the answer position: final hidden state -> logits, or straight to the training loss.

A one-token step of the fast engine spends more time in the vocabulary projection than in the
blocks before it: on CPU, with a step's few rows, reading the [vocab, hidden] weight is the cost,
and a plain step reads it twice (logits forward, gradient backward). `one_pass_cross_entropy` reads
it once: per vocabulary chunk it updates the running max, the softmax normaliser and the
softmax-weighted sum of weight rows (an online softmax, as in FlashAttention, Dao et al. 2022).
That sum is the loss's gradient with respect to the hidden state, kept for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import LoadedModel

CHUNK_ROWS = 2048  # vocabulary rows per chunk: 4.7 MB of float32 weight at hidden size 576


class Readout:
    """What the causal-LM head does to the final hidden state, for float32 logits at one position."""

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
        """[B, hidden] -> [B, vocab] float32, as the model's own forward computes them."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the logits of `hidden` against `labels` [B]."""
        if self.one_pass:
            return one_pass_cross_entropy(hidden, self.head.weight, labels)
        return F.cross_entropy(self.logits(hidden), labels)


def one_pass_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = CHUNK_ROWS) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, differentiable in `hidden` only."""
    return _OnePassCrossEntropy.apply(hidden, weight, labels, chunk)


class _OnePassCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        loss, grad = _loss_and_gradient(hidden, weight, labels, chunk)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None


def _loss_and_gradient(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """loss = mean(logsumexp(l) - l[y]); d loss / d hidden = (softmax(l) @ weight - weight[y]) / B."""
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
    loss = (running_max + normaliser.log() - target_logits).mean()
    grad = (weighted / normaliser[:, None] - target_rows) / rows
    return loss, grad
