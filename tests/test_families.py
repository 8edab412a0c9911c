"""Every model family in `FAMILIES`, on a tiny random model of its own: each stream hooks the tensor
it claims, vanilla swaps behave, the fast engine equals the reference engine (one-token labels, and
labels of several tokens over two prompt lengths), heads split and join back exactly, and the hooked
module paths are pinned.

Expected tensors are computed from the block's weights and norms (called directly, never through
a hook), so a wrong path, side or column layout in the family table shows up as a mismatch.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers.pytorch_utils import Conv1D

from das_cli.data import PairGroup, PairSet
from das_cli.activations import base_run
from das_cli.engines import CellGroup, FastEngine, ReferenceEngine
from das_cli.errors import DasError
from das_cli.models import FAMILIES, family_of, load_model
from das_cli.sites import HEAD_STREAMS, STREAMS, gather, head_counts, hooked, read_site, resolve_site, scatter

CONF = Path(__file__).parents[1] / "conf" / "model"
# model_type -> tiny config; every row of FAMILIES has one
TINY = {
    "gpt2": "tiny_gpt2",
    "llama": "tiny_llama",
    "mistral": "tiny_mistral",
    "qwen2": "tiny_qwen2",
    "qwen3": "tiny_qwen3",
    "gpt_neox": "tiny_gpt_neox",
    "gemma": "tiny_gemma",
    "gemma2": "tiny_gemma2",
    "olmo2": "tiny_olmo2",
}
LAYER = 2  # a middle layer of the 4-layer tiny models, not the last
B, T = 3, 9
ATOL = 1e-5
ENGINE_ATOL = 1e-4
WHOLE_STREAMS = [s for s in STREAMS if s not in HEAD_STREAMS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(TINY))
def lm(request):
    lm = load_model(OmegaConf.load(CONF / f"{TINY[request.param]}.yaml"), "cpu", "float32")
    assert lm.model.config.model_type == request.param
    return lm


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def other_ids(ids):
    other = torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(1))
    other[:, -1] = (ids[:, -1] + 1) % 1000  # certainly a different last token
    return other


@pytest.fixture(scope="module")
def reads(lm, ids):
    """Every whole-vector stream at LAYER, read through its hook."""
    return {s: read_site(lm, resolve_site(lm, s, LAYER), ids) for s in WHOLE_STREAMS}


def heads_for(lm, stream):
    """A strict subset of the stream's heads, in a non-sorted order where there are enough."""
    n, _ = head_counts(lm, stream)
    return (2, 0) if n > 2 else (1,)


def last_logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()


# --- each family's block, written out from its modules ---------------------------------------


def linear(proj, x):
    """The projection from its weights: GPT-2's Conv1D stores W as [in, out]; nn.Linear as [out, in]."""
    if isinstance(proj, Conv1D):
        return x @ proj.weight + proj.bias
    return F.linear(x, proj.weight, proj.bias)


def block_math(lm, block):
    """(attention_input(x), mlp_input(x, a), block_output(x, a, m)) of one block, per family:
    x block input, a attention output, m MLP output."""
    kind = lm.model.config.model_type
    if kind == "gpt2":
        return (block.ln_1, lambda x, a: block.ln_2(x + a), lambda x, a, m: x + a + m)
    if kind == "gpt_neox":  # parallel residual: both read the block input
        assert lm.model.config.use_parallel_residual
        return (block.input_layernorm, lambda x, a: block.post_attention_layernorm(x), lambda x, a, m: x + a + m)
    if kind == "gemma2":  # norms before and after both attention and MLP
        mid = lambda x, a: x + block.post_attention_layernorm(a)  # noqa: E731
        return (
            block.input_layernorm,
            lambda x, a: block.pre_feedforward_layernorm(mid(x, a)),
            lambda x, a, m: mid(x, a) + block.post_feedforward_layernorm(m),
        )
    if kind == "olmo2":  # norms only after attention and MLP
        mid = lambda x, a: x + block.post_attention_layernorm(a)  # noqa: E731
        return (lambda x: x, mid, lambda x, a, m: mid(x, a) + block.post_feedforward_layernorm(m))
    return (block.input_layernorm, lambda x, a: block.post_attention_layernorm(x + a), lambda x, a, m: x + a + m)


def mlp_hidden(lm, mlp, x):
    """The MLP's hidden activation from its input (gated: act(gate x) * up x)."""
    kind = lm.model.config.model_type
    if kind == "gpt2":
        return mlp.act(linear(mlp.c_fc, x))
    if kind == "gpt_neox":
        return mlp.act(linear(mlp.dense_h_to_4h, x))
    return mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x)


def mlp_down(lm, mlp, h):
    kind = lm.model.config.model_type
    proj = {"gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}.get(kind, "down_proj")
    return linear(getattr(mlp, proj), h)


def qkv(lm, block, x):
    """q, k, v [B, T, heads*head_dim] from the attention input, split as each modeling file splits."""
    kind = lm.model.config.model_type
    if kind == "gpt2":
        return linear(block.attn.c_attn, x).split(lm.hidden_size, dim=-1)
    if kind == "gpt_neox":  # modeling_gpt_neox: .view(*shape, -1, 3 * head_size) then .chunk(3, dim=-1)
        attn = block.attention
        fused = linear(attn.query_key_value, x).view(*x.shape[:-1], -1, 3 * attn.head_size)
        return tuple(part.reshape(*x.shape[:-1], -1) for part in fused.chunk(3, dim=-1))
    attn = block.self_attn
    return linear(attn.q_proj, x), linear(attn.k_proj, x), linear(attn.v_proj, x)


# --- 1. each stream is the tensor it claims ----------------------------------------------------


def test_block_streams_are_hidden_states(lm, ids, reads):
    hidden = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    torch.testing.assert_close(reads["block_input"], hidden[LAYER], atol=ATOL, rtol=0)
    torch.testing.assert_close(reads["block_output"], hidden[LAYER + 1], atol=ATOL, rtol=0)


def test_norms_and_residuals_recompose_the_block(lm, reads):
    """attention_input, mlp_input and block_output follow from block_input, attention_output and
    mlp_output through the family's norms and residual wiring."""
    attn_in, mlp_in, out = block_math(lm, lm.block(LAYER))
    x, a, m = reads["block_input"], reads["attention_output"], reads["mlp_output"]
    torch.testing.assert_close(reads["attention_input"], attn_in(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(reads["mlp_input"], mlp_in(x, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(reads["block_output"], out(x, a, m), atol=ATOL, rtol=0)


def test_out_projections(lm, reads):
    """out_proj(attention_value_output) = attention_output; down(mlp_activation) = mlp_output (with biases)."""
    block = lm.block(LAYER)
    out_proj = block.get_submodule(lm.family.attention_out_proj)
    projected = linear(out_proj, reads["attention_value_output"])
    torch.testing.assert_close(projected, reads["attention_output"], atol=ATOL, rtol=0)
    mlp = block.get_submodule(lm.family.mlp)
    torch.testing.assert_close(mlp_down(lm, mlp, reads["mlp_activation"]), reads["mlp_output"], atol=ATOL, rtol=0)


def test_mlp_activation_from_mlp_input(lm, reads):
    mlp = lm.block(LAYER).get_submodule(lm.family.mlp)
    torch.testing.assert_close(mlp_hidden(lm, mlp, reads["mlp_input"]), reads["mlp_activation"], atol=ATOL, rtol=0)


def test_qkv_are_projections_of_attention_input(lm, reads):
    """Before any q/k norm and RoPE; for fused projections, split as the modeling code splits."""
    q, k, v = qkv(lm, lm.block(LAYER), reads["attention_input"])
    torch.testing.assert_close(reads["query_output"], q, atol=ATOL, rtol=0)
    torch.testing.assert_close(reads["key_output"], k, atol=ATOL, rtol=0)
    torch.testing.assert_close(reads["value_output"], v, atol=ATOL, rtol=0)


def test_widths_follow_the_config(lm):
    config = lm.model.config
    n_q, d = head_counts(lm, "query_output")
    n_kv, _ = head_counts(lm, "key_output")
    assert n_q == config.num_attention_heads
    assert n_kv == getattr(config, "num_key_value_heads", n_q)
    assert d == (getattr(config, "head_dim", None) or config.hidden_size // n_q)
    widths = {s: resolve_site(lm, s, LAYER).width for s in WHOLE_STREAMS}
    assert widths["attention_value_output"] == widths["query_output"] == n_q * d
    assert widths["key_output"] == widths["value_output"] == n_kv * d
    assert widths["mlp_activation"] == (getattr(config, "intermediate_size", None) or 4 * config.hidden_size)


# --- 2. vanilla full swaps -------------------------------------------------------------------


def swap_last(lm, site, ids, values):
    """Last-position logits with the site's vector at the last position replaced by `values` [B, C]."""
    positions = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
    with hooked(site, lambda h: scatter(h, positions, site.columns, values)):
        return last_logits(lm, ids)


@pytest.mark.parametrize("stream", STREAMS)
def test_vanilla_full_swap(lm, ids, other_ids, stream):
    site = resolve_site(lm, stream, LAYER, heads_for(lm, stream) if stream in HEAD_STREAMS else None)
    clean = last_logits(lm, ids)
    same = read_site(lm, site, ids)[:, -1]
    torch.testing.assert_close(swap_last(lm, site, ids, same), clean, atol=ATOL, rtol=0)
    other = read_site(lm, site, other_ids)[:, -1]
    assert (other - same).abs().amax(-1).min() > 1e-3  # the source really differs
    change = (swap_last(lm, site, ids, other) - clean).abs().amax(-1).min()
    # q/k only move attention weights, nearly uniform in a random model: a small change
    assert change > (1e-7 if "query" in stream or "key" in stream else 1e-3)


# --- 3. the fast engine equals the reference engine --------------------------------------------


G = 4


def random_answers(gen: torch.Generator, widths: tuple[int, ...]) -> torch.Tensor:
    """[rows, max(widths)] random answers, row i `widths[i]` tokens long, -1 after its end."""
    labels = torch.randint(0, 1000, (len(widths), max(widths)), generator=gen)
    for i, width in enumerate(widths):
        labels[i, width:] = -1
    return labels


def random_pairs(gen: torch.Generator, rows: int, lengths: tuple[int, ...], widths: tuple[int, ...] | None = None) -> PairSet:
    """One group of `rows` random pairs per base length (sources as long as their bases); one-token
    labels, or labels `widths[i]` tokens long on row i."""
    return PairSet(groups=[
        PairGroup(
            base_ids=torch.randint(0, 1000, (rows, t), generator=gen),
            source_ids=torch.randint(0, 1000, (rows, t), generator=gen),
            labels=torch.randint(0, 1000, (rows,), generator=gen) if widths is None else random_answers(gen, widths),
            base_labels=torch.randint(0, 1000, (rows,), generator=gen),
            base_positions={},
            source_positions={},
        )
        for t in lengths
    ])


@pytest.fixture(scope="module")
def pairs():
    return random_pairs(torch.Generator().manual_seed(2), G, (T,))


@pytest.fixture(scope="module")
def base(lm, pairs):
    return base_run(lm, pairs, batch_size=3, keep_prefix=True, layers=(LAYER,))


@pytest.mark.parametrize("position", ["middle", "last"])
@pytest.mark.parametrize("stream", STREAMS)
def test_fast_equals_reference(lm, pairs, base, stream, position):
    site = resolve_site(lm, stream, LAYER, heads_for(lm, stream) if stream in HEAD_STREAMS else None)
    gen = torch.Generator().manual_seed(3)
    group = pairs.groups[0]
    positions = torch.full((G, 1), T // 2 if position == "middle" else T - 1)
    cell = CellGroup(
        base_ids=group.base_ids,
        base_positions=positions,
        source_values=torch.randn(G, site.width, generator=gen),
        labels=group.labels,
        prefix=base.prefixes[0],
        residual=base.residuals[0][LAYER],
    )
    W = torch.linalg.qr(torch.randn(site.width, 2, generator=gen))[0]
    rows = torch.tensor([2, 0, 3])
    source = cell.source_values[rows]

    def swap(b):
        return b + ((source - b) @ W) @ W.T

    with torch.no_grad():
        ref = ReferenceEngine(lm, site, [cell]).logits([(0, rows)], lambda b, s: swap(b))
        fast = FastEngine(lm, site, [cell]).logits([(0, rows)], lambda b, s: swap(b))
    torch.testing.assert_close(fast, ref, atol=ENGINE_ATOL, rtol=0)
    assert (ref[:, 0] - last_logits(lm, group.base_ids[rows])).abs().amax() > 1e-6  # the swap does something

    W.requires_grad_(True)  # the training loss and its gradient (the fast engine's reads the vocabulary once)
    losses = [engine(lm, site, [cell]).loss([(0, rows)], lambda b, s: swap(b)) for engine in (ReferenceEngine, FastEngine)]
    grads = [torch.autograd.grad(loss, W)[0] for loss in losses]
    torch.testing.assert_close(losses[1], losses[0], atol=ENGINE_ATOL, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=ENGINE_ATOL, rtol=0)


MULTI = (3, 1, 2)  # label widths per row: one-token and multi-token answers in one group


def check_two_lengths_like_reference(lm, stream: str, position: str, seed: int, joined: bool) -> None:
    """A batch of two prompt lengths (9 and 6 tokens), with labels of 1 to 3 tokens teacher-forced after
    them, through both engines: the same logits at every answer position, loss and gradient, with the
    fast engine's lengths joined into one forward or not as `joined` says; the base run's answers are
    the plain model's."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (T, T - 3)
    pairs = random_pairs(gen, B, lengths, MULTI)
    base = base_run(lm, pairs, batch_size=2, keep_prefix=True, layers=(LAYER,))
    for group, predictions in zip(pairs.groups, base.predictions):
        assert torch.equal(predictions[:, 0], last_logits(lm, group.base_ids).argmax(-1))
    site = resolve_site(lm, stream, LAYER)
    cells = [
        CellGroup(
            base_ids=group.base_ids,
            base_positions=torch.full((B, 1), t // 2 if position == "middle" else t - 1),
            source_values=torch.randn(B, site.width, generator=gen),
            labels=group.labels,
            prefix=base.prefixes[i],
            residual=base.residuals[i][LAYER],
        )
        for i, (group, t) in enumerate(zip(pairs.groups, lengths))
    ]
    batch = [(0, torch.tensor([2, 0])), (1, torch.tensor([1, 2, 0]))]
    fast = FastEngine(lm, site, cells)
    assert fast.joinable(batch) == joined
    W0 = torch.linalg.qr(torch.randn(site.width, 2, generator=gen))[0]
    out = []
    for engine in (ReferenceEngine(lm, site, cells), fast):
        W = W0.clone().requires_grad_(True)

        def intervene(b, s):
            return b + ((s - b) @ W) @ W.T

        with torch.no_grad():
            logits = engine.logits(batch, intervene)
        loss = engine.loss(batch, intervene)
        out.append((logits, loss.detach(), torch.autograd.grad(loss, W)[0]))
    assert out[0][0].shape == (5, max(MULTI), lm.model.config.vocab_size)
    for name, expected, got in zip(("logits", "loss", "grad"), *out):
        torch.testing.assert_close(got, expected, atol=ENGINE_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        unedited = torch.cat([last_logits(lm, cells[g].base_ids[rows]) for g, rows in batch])
    assert (out[0][0][:, 0] - unedited).abs().amax() > 1e-6  # the swap does something


@pytest.mark.slow  # every family and stream; GPT-2 and Llama are in the quick tier (test_engines.py, mixed lengths)
@pytest.mark.parametrize("position", ["middle", "last"])
@pytest.mark.parametrize("stream", WHOLE_STREAMS)
def test_fast_joins_prompt_lengths_like_reference(lm, stream, position):
    """The fast engine's one left-padded forward (masked prefix, each row's own position ids, the
    labels' tokens fed after the prompts) gives each row's own logits."""
    check_two_lengths_like_reference(lm, stream, position, seed=4, joined=True)


@pytest.mark.parametrize("position", ["middle", "last"])
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "qwen2"])
def test_fast_equals_reference_with_a_short_sliding_window(kind, position):
    """A sliding window (4) shorter than the prompts: the base run's recorded keys and values, the
    prefix cache's window and the per-length fallback still give the reference's logits."""
    cfg = OmegaConf.load(CONF / f"{TINY[kind]}.yaml")
    cfg.random_init.sliding_window = 4
    if kind == "qwen2":
        cfg.random_init.update(use_sliding_window=True, max_window_layers=0)
    check_two_lengths_like_reference(load_model(cfg, "cpu", "float32"), "block_output", position, seed=5, joined=False)


# --- 4. heads split and join back --------------------------------------------------------------


@pytest.mark.parametrize("stream", list(HEAD_STREAMS))
def test_heads_split_and_join(lm, ids, stream):
    """Head h's columns are the h-th head_dim block of the whole stream; gather then scatter of any
    head set is the identity on the hooked tensor; all heads in order are the whole stream."""
    whole = resolve_site(lm, HEAD_STREAMS[stream], LAYER)
    n, d = head_counts(lm, stream)
    everything = resolve_site(lm, stream, LAYER)
    assert torch.equal(everything.columns, whole.columns) and everything.heads == tuple(range(n))
    for h in range(n):
        assert torch.equal(resolve_site(lm, stream, LAYER, (h,)).columns, whole.columns[h * d : (h + 1) * d])

    site = resolve_site(lm, stream, LAYER, heads_for(lm, stream))
    captured = []
    with hooked(site, lambda hidden: captured.append(hidden.clone())):
        lm.model(input_ids=ids, logits_to_keep=1)
    hidden = captured[0]
    positions = torch.tensor([[T - 1, 1]] * B)
    for columns in (site.columns, whole.columns):
        round_trip = scatter(hidden, positions, columns, gather(hidden, positions, columns))
        torch.testing.assert_close(round_trip, hidden, atol=0, rtol=0)
    heads = [resolve_site(lm, stream, LAYER, (h,)).columns for h in range(n)]
    per_head = torch.cat([gather(hidden, positions, columns).view(B, 2, d) for columns in heads], -1)
    torch.testing.assert_close(per_head.reshape(B, -1), gather(hidden, positions, whole.columns), atol=0, rtol=0)


def test_gpt_neox_fused_columns_are_per_head():
    """query_key_value's output is [heads, 3, head_dim]: head h's q, k, v are adjacent blocks."""
    lm = load_model(OmegaConf.load(CONF / "tiny_gpt_neox.yaml"), "cpu", "float32")
    assert lm.family.qkv_layout == "per_head"
    d = 16
    for which, stream in enumerate(("query_output", "key_output", "value_output")):
        site = resolve_site(lm, stream, 1)
        assert site.module is lm.block(1).attention.query_key_value
        expected = [h * 3 * d + which * d + i for h in range(4) for i in range(d)]
        assert site.columns.tolist() == expected
    site = resolve_site(lm, "head_value_output", 1, heads=(3, 1))
    assert site.columns.tolist() == list(range(9 * d + 2 * d, 12 * d)) + list(range(3 * d + 2 * d, 6 * d))


# --- 5. golden: the hooked module of every stream, first layer -----------------------------------


_LLAMA_LIKE_PATHS = {
    "block_input": ("model.layers.0", "input"),
    "block_output": ("model.layers.0", "output"),
    "attention_input": ("model.layers.0.self_attn", "input"),
    "attention_output": ("model.layers.0.self_attn", "output"),
    "attention_value_output": ("model.layers.0.self_attn.o_proj", "input"),
    "query_output": ("model.layers.0.self_attn.q_proj", "output"),
    "key_output": ("model.layers.0.self_attn.k_proj", "output"),
    "value_output": ("model.layers.0.self_attn.v_proj", "output"),
    "mlp_input": ("model.layers.0.mlp", "input"),
    "mlp_activation": ("model.layers.0.mlp.down_proj", "input"),
    "mlp_output": ("model.layers.0.mlp", "output"),
}
GOLDEN = {
    "gpt2": {
        "block_input": ("transformer.h.0", "input"),
        "block_output": ("transformer.h.0", "output"),
        "attention_input": ("transformer.h.0.attn", "input"),
        "attention_output": ("transformer.h.0.attn", "output"),
        "attention_value_output": ("transformer.h.0.attn.c_proj", "input"),
        "query_output": ("transformer.h.0.attn.c_attn", "output"),
        "key_output": ("transformer.h.0.attn.c_attn", "output"),
        "value_output": ("transformer.h.0.attn.c_attn", "output"),
        "mlp_input": ("transformer.h.0.mlp", "input"),
        "mlp_activation": ("transformer.h.0.mlp.act", "output"),
        "mlp_output": ("transformer.h.0.mlp", "output"),
    },
    "gpt_neox": {
        "block_input": ("gpt_neox.layers.0", "input"),
        "block_output": ("gpt_neox.layers.0", "output"),
        "attention_input": ("gpt_neox.layers.0.attention", "input"),
        "attention_output": ("gpt_neox.layers.0.attention", "output"),
        "attention_value_output": ("gpt_neox.layers.0.attention.dense", "input"),
        "query_output": ("gpt_neox.layers.0.attention.query_key_value", "output"),
        "key_output": ("gpt_neox.layers.0.attention.query_key_value", "output"),
        "value_output": ("gpt_neox.layers.0.attention.query_key_value", "output"),
        "mlp_input": ("gpt_neox.layers.0.mlp", "input"),
        "mlp_activation": ("gpt_neox.layers.0.mlp.act", "output"),
        "mlp_output": ("gpt_neox.layers.0.mlp", "output"),
    },
    **{kind: _LLAMA_LIKE_PATHS for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2")},
}


def test_every_family_has_a_tiny_model_and_golden_paths():
    assert set(FAMILIES) == set(TINY) == set(GOLDEN)


def test_golden_hook_paths(lm):
    names = {module: name for name, module in lm.model.named_modules()}
    expected = GOLDEN[lm.model.config.model_type]
    got = {}
    for stream in STREAMS:
        site = resolve_site(lm, stream, 0)
        got[stream] = (names[site.module], site.side)
        if stream in HEAD_STREAMS:
            assert got[stream] == expected[HEAD_STREAMS[stream]], stream
    assert list(got)[: len(expected)] == list(expected)  # the vocabulary's order
    assert {s: got[s] for s in expected} == expected
    assert lm.model.get_submodule(lm.family.final_norm) is not None


def test_unknown_architecture_is_one_line():
    model = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    with pytest.raises(DasError) as err:
        family_of(model)
    message = str(err.value)
    assert "\n" not in message and "'bert' is not supported" in message
    for kind in FAMILIES:
        assert kind in message
