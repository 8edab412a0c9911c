"""Each stream hooks the tensor it claims (stream names as in pyvene, Wu et al. 2024, arXiv 2403.07809),
checked against hand computations.

Every expected tensor below is computed from the model's weights with plain torch ops (layer
norms, projections, causal attention with RoPE, MLPs), never through the hooks under test.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from das_cli.errors import DasError
from das_cli.models import load_model
from das_cli.sites import (
    HEAD_STREAMS,
    STREAMS,
    gather,
    head_counts,
    hooked,
    read_site,
    resolve_site,
    scatter,
)

CONF = Path(__file__).parents[1] / "conf" / "model"
MODELS = ("tiny_gpt2", "tiny_llama")
ATOL = 1e-5
B, T = 3, 9


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def lm(request):
    return load_model(OmegaConf.load(CONF / f"{request.param}.yaml"), "cpu", "float32")


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 1000, (B, T))


@pytest.fixture(scope="module")
def other_ids(ids):
    torch.manual_seed(1)
    other = torch.randint(0, 1000, (B, T))
    other[:, -1] = (ids[:, -1] + 1) % 1000  # certainly a different last token
    return other


def is_llama(lm) -> bool:
    return lm.model.config.model_type == "llama"


# --- manual computations from the weights --------------------------------------------------


def rms_norm(norm, x):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def layer_norm(ln, x):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def conv1d(proj, x):
    """GPT-2's Conv1D is x @ W + b with W stored [in, out]."""
    return x @ proj.weight + proj.bias


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def norm1(lm, block, x):
    return rms_norm(block.input_layernorm, x) if is_llama(lm) else layer_norm(block.ln_1, x)


def norm2(lm, block, x):
    return rms_norm(block.post_attention_layernorm, x) if is_llama(lm) else layer_norm(block.ln_2, x)


def qkv(lm, block, normed):
    """q, k, v projections of the normed input (before RoPE), each [B, T, n*head_dim]."""
    if is_llama(lm):
        a = block.self_attn
        return normed @ a.q_proj.weight.T, normed @ a.k_proj.weight.T, normed @ a.v_proj.weight.T
    return conv1d(block.attn.c_attn, normed).split(lm.hidden_size, dim=-1)


def rope(x, theta):
    """x [B, H, T, d] rotated per position with the default (non-scaled) rotary embedding."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def attention_values(lm, q, k, v):
    """Causal softmax attention; the concatenated head outputs [B, T, H*d] (input of the out-proj)."""
    config = lm.model.config
    n_heads, head_dim = head_counts(lm, "query_output")
    n_kv, _ = head_counts(lm, "key_output")
    b, t, _ = q.shape

    def split(x, n):
        return x.view(b, t, n, head_dim).transpose(1, 2)

    q, k, v = split(q, n_heads), split(k, n_kv), split(v, n_kv)
    if is_llama(lm):
        theta = config.rope_parameters["rope_theta"]
        q, k = rope(q, theta), rope(k, theta)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(-1) @ v  # [B, H, T, d]
    return out.transpose(1, 2).reshape(b, t, n_heads * head_dim)


def out_proj(lm, block, x):
    return x @ block.self_attn.o_proj.weight.T if is_llama(lm) else conv1d(block.attn.c_proj, x)


def mlp_act(lm, block, x):
    if is_llama(lm):
        m = block.mlp
        gate = x @ m.gate_proj.weight.T
        return gate * torch.sigmoid(gate) * (x @ m.up_proj.weight.T)
    return gelu_new(conv1d(block.mlp.c_fc, x))


def mlp_down(lm, block, x):
    return x @ block.mlp.down_proj.weight.T if is_llama(lm) else conv1d(block.mlp.c_proj, x)


@torch.no_grad()
def manual_streams(lm, ids, layer):
    """Every whole-vector stream of one block, from the weights (block_input from hidden_states)."""
    hidden = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    block = lm.block(layer)
    x = hidden[layer]
    attn_in = norm1(lm, block, x)
    q, k, v = qkv(lm, block, attn_in)
    values = attention_values(lm, q, k, v)
    attn_out = out_proj(lm, block, values)
    mlp_in = norm2(lm, block, x + attn_out)
    act = mlp_act(lm, block, mlp_in)
    mlp_out = mlp_down(lm, block, act)
    return {
        "block_input": x,
        "block_output": x + attn_out + mlp_out,
        "attention_input": attn_in,
        "attention_output": attn_out,
        "attention_value_output": values,
        "query_output": q,
        "key_output": k,
        "value_output": v,
        "mlp_input": mlp_in,
        "mlp_activation": act,
        "mlp_output": mlp_out,
    }, hidden


def read(lm, stream, layer, ids, heads=None):
    return read_site(lm, resolve_site(lm, stream, layer, heads), ids)


# --- every stream equals its hand computation ----------------------------------------------


def test_manual_model_matches_hidden_states(lm, ids):
    """The hand-written forward is right: its block outputs equal the model's hidden states."""
    for layer in range(lm.n_layers - 1):
        manual, hidden = manual_streams(lm, ids, layer)
        torch.testing.assert_close(manual["block_output"], hidden[layer + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, 3])
@pytest.mark.parametrize("stream", [s for s in STREAMS if s not in HEAD_STREAMS])
def test_stream_reads_its_tensor(lm, ids, stream, layer):
    manual, _ = manual_streams(lm, ids, layer)
    got = read(lm, stream, layer, ids)
    assert got.shape == manual[stream].shape
    torch.testing.assert_close(got, manual[stream], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1])
def test_block_streams_against_hidden_states(lm, ids, layer):
    hidden = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    torch.testing.assert_close(read(lm, "block_input", layer, ids), hidden[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(read(lm, "block_output", layer, ids), hidden[layer + 1], atol=ATOL, rtol=0)


def test_last_block_output_is_before_final_norm(lm, ids):
    last = lm.n_layers - 1
    hidden = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    final_norm = lm.model.get_submodule(lm.family.final_norm)
    out = read(lm, "block_output", last, ids)
    torch.testing.assert_close(final_norm(out), hidden[-1], atol=ATOL, rtol=0)


def test_attention_output_satisfies_residual_identity(lm, ids):
    """block_output = x + a + mlp(norm2(x + a)) with a read through the hook, mlp from weights."""
    layer = 1
    block = lm.block(layer)
    hidden = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    x, y = hidden[layer], hidden[layer + 1]
    a = read(lm, "attention_output", layer, ids)
    mlp = mlp_down(lm, block, mlp_act(lm, block, norm2(lm, block, x + a)))
    torch.testing.assert_close(x + a + mlp, y, atol=ATOL, rtol=0)


def test_projections_of_read_streams(lm, ids):
    """out_proj(attention_value_output) = attention_output; down(mlp_activation) = mlp_output;
    q/k/v = projections of attention_input; mlp_input = norm2(block_input + attention_output)."""
    layer = 1
    block = lm.block(layer)
    r = {s: read(lm, s, layer, ids) for s in STREAMS if s not in HEAD_STREAMS}
    torch.testing.assert_close(out_proj(lm, block, r["attention_value_output"]), r["attention_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(mlp_down(lm, block, r["mlp_activation"]), r["mlp_output"], atol=ATOL, rtol=0)
    q, k, v = qkv(lm, block, r["attention_input"])
    torch.testing.assert_close(q, r["query_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(k, r["key_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(v, r["value_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        norm2(lm, block, r["block_input"] + r["attention_output"]), r["mlp_input"], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(norm1(lm, block, r["block_input"]), r["attention_input"], atol=ATOL, rtol=0)
    torch.testing.assert_close(mlp_act(lm, block, r["mlp_input"]), r["mlp_activation"], atol=ATOL, rtol=0)


# --- widths, columns and heads ---------------------------------------------------------------


def test_widths(lm):
    hidden = lm.hidden_size
    config = lm.model.config
    kv = config.num_key_value_heads * config.head_dim if is_llama(lm) else hidden
    inner = config.intermediate_size if is_llama(lm) else 4 * hidden
    expected = {
        "block_input": hidden,
        "block_output": hidden,
        "attention_input": hidden,
        "attention_output": hidden,
        "attention_value_output": hidden,
        "query_output": hidden,
        "key_output": kv,
        "value_output": kv,
        "mlp_input": hidden,
        "mlp_activation": inner,
        "mlp_output": hidden,
    }
    for stream, width in expected.items():
        site = resolve_site(lm, stream, 1)
        assert site.width == width, stream
        assert site.heads is None
        assert site.stream == stream and site.layer == 1
    for stream in HEAD_STREAMS:  # every head by default
        n, d = head_counts(lm, stream)
        site = resolve_site(lm, stream, 1)
        assert site.heads == tuple(range(n))
        assert site.width == n * d == expected[HEAD_STREAMS[stream]]


def test_head_counts(lm):
    config = lm.model.config
    kv = config.num_key_value_heads if is_llama(lm) else config.num_attention_heads
    for stream in ("head_query_output", "query_output", "head_attention_value_output", "attention_value_output"):
        assert head_counts(lm, stream) == (4, 16)
    for stream in ("head_key_output", "key_output", "head_value_output", "value_output"):
        assert head_counts(lm, stream) == (kv, 16)
    if is_llama(lm):
        assert kv == 2  # grouped-query attention


def test_gpt2_fused_qkv_columns():
    lm = load_model(OmegaConf.load(CONF / "tiny_gpt2.yaml"), "cpu", "float32")
    for i, stream in enumerate(("query_output", "key_output", "value_output")):
        site = resolve_site(lm, stream, 2)
        assert site.module is lm.block(2).attn.c_attn and site.side == "output"
        assert site.columns.tolist() == list(range(64 * i, 64 * (i + 1)))
    site = resolve_site(lm, "head_key_output", 2, heads=(1, 3))
    assert site.columns.tolist() == list(range(64 + 16, 64 + 32)) + list(range(64 + 48, 64 + 64))


def head_sets(lm, stream):
    n, _ = head_counts(lm, stream)
    return [(1,), (0, 2)] if n >= 3 else [(1,), (0, 1)]


@pytest.mark.parametrize("stream", list(HEAD_STREAMS))
def test_head_streams_are_slices_of_the_full_stream(lm, ids, stream):
    layer = 1
    full = read(lm, HEAD_STREAMS[stream], layer, ids)
    _, d = head_counts(lm, stream)
    for heads in head_sets(lm, stream):
        site = resolve_site(lm, stream, layer, heads)
        assert site.heads == heads and site.width == len(heads) * d
        got = read_site(lm, site, ids)
        expected = torch.cat([full[..., h * d : (h + 1) * d] for h in heads], dim=-1)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_head_order_follows_the_request(lm, ids):
    """heads=(2, 0) concatenates head 2 then head 0."""
    full = read(lm, "query_output", 1, ids)
    got = read(lm, "head_query_output", 1, ids, heads=(2, 0))
    torch.testing.assert_close(got, torch.cat([full[..., 32:48], full[..., 0:16]], dim=-1), atol=0, rtol=0)


# --- gather / scatter ------------------------------------------------------------------------


def test_gather_picks_positions_then_columns():
    hidden = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 4, 5)  # value = 20 b + 5 t + c
    positions = torch.tensor([[1, 3], [0, 2]])
    columns = torch.tensor([4, 0])
    got = gather(hidden, positions, columns)
    expected = torch.tensor([[9.0, 5.0, 19.0, 15.0], [24.0, 20.0, 34.0, 30.0]])
    torch.testing.assert_close(got, expected)


def test_scatter_writes_only_chosen_entries():
    hidden = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 4, 5)
    positions = torch.tensor([[1, 3], [0, 2]])
    columns = torch.tensor([4, 0])
    values = -torch.arange(1, 9, dtype=torch.float32).view(2, 4)
    out = scatter(hidden, positions, columns, values)
    expected = hidden.clone()
    expected[0, 1, 4], expected[0, 1, 0], expected[0, 3, 4], expected[0, 3, 0] = -1, -2, -3, -4
    expected[1, 0, 4], expected[1, 0, 0], expected[1, 2, 4], expected[1, 2, 0] = -5, -6, -7, -8
    torch.testing.assert_close(out, expected)
    assert torch.equal(hidden, torch.arange(40, dtype=torch.float32).view(2, 4, 5))  # input untouched
    torch.testing.assert_close(gather(out, positions, columns), values)


def test_gather_scatter_round_trip():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 6)
    positions = torch.tensor([[6, 2], [0, 6], [3, 4]])
    columns = torch.tensor([5, 1, 2])
    torch.testing.assert_close(scatter(hidden, positions, columns, gather(hidden, positions, columns)), hidden)


def test_scatter_is_differentiable_in_values():
    hidden = torch.zeros(2, 3, 4)
    values = torch.randn(2, 2, requires_grad=True)
    out = scatter(hidden, torch.tensor([[1], [2]]), torch.tensor([0, 3]), values)
    (out * torch.arange(24.0).view(2, 3, 4)).sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[4.0, 7.0], [20.0, 23.0]]))


# --- hooks -----------------------------------------------------------------------------------


def hook_ids(module) -> tuple:
    """The module's registered hooks (transformers keeps output-capturing hooks of its own)."""
    return (
        tuple(module._forward_hooks),
        tuple(module._forward_pre_hooks),
        tuple(module._forward_pre_hooks_with_kwargs),
        tuple(module._forward_hooks_with_kwargs),
    )


@pytest.mark.parametrize("stream", ["block_input", "attention_input", "mlp_output", "mlp_activation"])
def test_hooked_removes_hook_when_forward_raises(lm, ids, stream):
    site = resolve_site(lm, stream, 1)
    before = hook_ids(site.module)
    assert not before[1]  # no pre-hooks left by anyone

    def boom(hidden):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooked(site, boom):
            lm.model(input_ids=ids)
    assert hook_ids(site.module) == before
    with pytest.raises(KeyError):
        with hooked(site, lambda h: None):
            raise KeyError("body")
    assert hook_ids(site.module) == before
    read_site(lm, site, ids)  # stops the forward with an exception of its own
    assert hook_ids(site.module) == before


def last_logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("stream", STREAMS)
def test_identity_edits_leave_logits_unchanged(lm, ids, stream):
    site = resolve_site(lm, stream, 1)
    clean = last_logits(lm, ids)
    for edit in (lambda h: None, lambda h: h, lambda h: h.clone()):
        with hooked(site, edit):
            torch.testing.assert_close(last_logits(lm, ids), clean, atol=ATOL, rtol=0)


def swap_last(lm, site, ids, values):
    """Logits with the site's vector at the last position replaced by `values` [B, C]."""
    positions = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
    columns = site.columns

    def edit(hidden):
        return scatter(hidden, positions, columns, values)

    with hooked(site, edit):
        return last_logits(lm, ids)


@pytest.mark.parametrize("stream", STREAMS)
def test_vanilla_full_swap(lm, ids, other_ids, stream):
    heads = (1,) if stream in HEAD_STREAMS else None
    site = resolve_site(lm, stream, 1, heads)
    clean = last_logits(lm, ids)
    same = read_site(lm, site, ids)[:, -1]
    torch.testing.assert_close(swap_last(lm, site, ids, same), clean, atol=ATOL, rtol=0)
    other = read_site(lm, site, other_ids)[:, -1]
    assert (other - same).abs().amax(-1).min() > 1e-3  # the source really differs
    change = (swap_last(lm, site, ids, other) - clean).abs().amax(-1).min()
    # At the last position every stream feeds the last position's logits, so every row changes;
    # q/k only move attention weights, which are nearly uniform in a random model: a small change.
    assert change > (1e-7 if "query" in stream or "key" in stream else 1e-3)


def test_last_layer_full_swap_copies_the_other_prompt(lm, ids, other_ids):
    """Swapping block_output of the last block at the last position gives the other prompt's logits."""
    site = resolve_site(lm, "block_output", lm.n_layers - 1)
    other = read_site(lm, site, other_ids)[:, -1]
    torch.testing.assert_close(swap_last(lm, site, ids, other), last_logits(lm, other_ids), atol=ATOL, rtol=0)


def test_swap_at_later_position_leaves_earlier_logits(lm, ids, other_ids):
    """Causality: editing position 5 changes nothing before it."""
    site = resolve_site(lm, "block_input", 1)
    positions = torch.full((B, 1), 5)
    values = gather(read_site(lm, site, other_ids), positions, site.columns)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with hooked(site, lambda h: scatter(h, positions, site.columns, values)):
            edited = lm.model(input_ids=ids).logits
    torch.testing.assert_close(edited[:, :5], clean[:, :5], atol=ATOL, rtol=0)
    assert (edited[:, 5:] - clean[:, 5:]).abs().amax() > 1e-5


# --- resolve_site errors ---------------------------------------------------------------------


def test_unknown_stream_lists_choices(lm):
    with pytest.raises(DasError) as err:
        resolve_site(lm, "residual", 1)
    message = str(err.value)
    assert "residual" in message
    for stream in STREAMS:
        assert stream in message


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_layer_out_of_range(lm, layer):
    with pytest.raises(DasError, match=r"0\.\.3"):
        resolve_site(lm, "block_output", layer)


def test_heads_on_non_head_stream(lm):
    with pytest.raises(DasError, match="not head-level"):
        resolve_site(lm, "query_output", 1, heads=(0,))


def test_head_index_out_of_range(lm):
    with pytest.raises(DasError, match=r"valid heads: 0\.\.3"):
        resolve_site(lm, "head_query_output", 1, heads=(4,))
    with pytest.raises(DasError, match="valid heads"):
        resolve_site(lm, "head_query_output", 1, heads=(-1,))
    with pytest.raises(DasError, match="valid heads"):
        resolve_site(lm, "head_query_output", 1, heads=())
    n_kv, _ = head_counts(lm, "head_key_output")
    with pytest.raises(DasError, match=rf"valid heads: 0\.\.{n_kv - 1}"):
        resolve_site(lm, "head_value_output", 1, heads=(n_kv,))
    if is_llama(lm):  # GQA: query heads 2, 3 exist but key/value heads do not
        resolve_site(lm, "head_query_output", 1, heads=(3,))
        with pytest.raises(DasError):
            resolve_site(lm, "head_key_output", 1, heads=(2,))


def test_repeated_heads_are_rejected(lm):
    with pytest.raises(DasError, match="heads"):
        resolve_site(lm, "head_query_output", 1, heads=(1, 1))


def test_one_pass_reads_many_sites_like_single_reads(lm):
    """read_sites hooks several sites in one forward (stopped after the deepest); each equals its own read."""
    from das_cli.sites import read_sites

    ids = torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(3))
    sites = [resolve_site(lm, "block_output", 2), resolve_site(lm, "mlp_activation", 0),
             resolve_site(lm, "head_value_output", 1, (1,)), resolve_site(lm, "block_input", 3)]
    together = read_sites(lm, sites, ids)
    for site, tensor in zip(sites, together):
        torch.testing.assert_close(tensor, read_site(lm, site, ids), rtol=0, atol=0)


def test_site_chunks_respect_the_budget(lm):
    from das_cli.activations import chunks as site_chunks

    sites = [resolve_site(lm, "block_output", layer) for layer in range(4)]  # 50 tokens x 64 x 4 B each
    chunks = site_chunks(sites, 50, 4, budget=2 * 50 * 64 * 4)
    assert [len(c) for c in chunks] == [2, 2]
    assert [s for c in chunks for s in c] == sites
