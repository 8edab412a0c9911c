"""The one-pass cross-entropy equals the plain one (loss and gradient), and the readout picks the
plain path where the one-pass one would not apply."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from das_cli.models import load_model
from das_cli.readout import Readout, one_pass_cross_entropy

CONF = Path(__file__).parents[1] / "conf" / "model"


def plain(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 5000])  # 1000 divides the vocabulary; 5000 is above it
def test_one_pass_matches_plain(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(1000, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 999, 3, 3, 500])
    fused = hidden.clone().requires_grad_()
    reference = hidden.clone().requires_grad_()
    loss = one_pass_cross_entropy(fused, weight, labels, chunk)
    expected = plain(reference, weight, labels)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    (3.0 * loss).backward()  # the incoming gradient scales the saved one
    (3.0 * expected).backward()
    torch.testing.assert_close(fused.grad, reference.grad, atol=1e-12, rtol=0)


def test_one_pass_is_stable_for_large_logits():
    """Logits in the thousands: a naive exp overflows; the running max keeps it finite and right."""
    hidden = torch.tensor([[100.0, -50.0], [0.0, 80.0]], requires_grad=True)
    weight = torch.tensor([[30.0, 0.0], [29.0, 1.0], [0.0, 40.0], [-10.0, 10.0]])
    labels = torch.tensor([1, 2])
    loss = one_pass_cross_entropy(hidden, weight, labels, 3)
    expected = plain(hidden.detach(), weight, labels)
    assert torch.isfinite(loss) and torch.isclose(loss, expected, atol=1e-4)


def test_readout_logits_are_the_models():
    lm = load_model(OmegaConf.load(CONF / "tiny_llama.yaml"), "cpu", "float32")
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        expected = lm.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        hidden = lm.model.base_model(input_ids=ids).last_hidden_state[:, -1]
    readout = Readout(lm)
    assert readout.one_pass  # float32 on CPU, no bias, no soft-capping
    torch.testing.assert_close(readout.logits(hidden), expected, atol=1e-5, rtol=0)


def fake_lm(bias: bool, softcap, dtype=torch.float32):
    head = torch.nn.Linear(4, 10, bias=bias).to(dtype)
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace(final_logit_softcapping=softcap))
    return SimpleNamespace(model=model)


@pytest.mark.parametrize(
    "bias, softcap, dtype, one_pass",
    [(False, None, torch.float32, True), (True, None, torch.float32, False),
     (False, 30.0, torch.float32, False), (False, None, torch.bfloat16, False)],
)
def test_readout_falls_back_to_plain(bias, softcap, dtype, one_pass):
    readout = Readout(fake_lm(bias, softcap, dtype))
    assert readout.one_pass is one_pass
    hidden = torch.randn(3, 4, dtype=dtype)
    labels = torch.tensor([1, 2, 9])
    logits = readout.head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    torch.testing.assert_close(readout.logits(hidden), logits.float())
    torch.testing.assert_close(readout.loss(hidden, labels), F.cross_entropy(logits.float(), labels), atol=1e-5, rtol=0)
