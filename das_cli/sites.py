"""Sites: where an intervention reads and writes (stream, layer, heads), and the hooks that do it.

A site is a module inside one block, a side of it (its input or its output), and a set of
columns of that tensor's last dimension. Whole-vector streams use every column; q/k/v streams
of fused projections (GPT-2's `c_attn`) use a slice; head-level streams use the slices of the
chosen heads, concatenated. Token positions are chosen per example at intervention time.

Streams (names follow pyvene), with the width d of their vector per position:

| stream                       | tensor                                            | width           |
|------------------------------|---------------------------------------------------|-----------------|
| block_input                  | residual stream entering the block                | hidden          |
| block_output                 | residual stream leaving the block                 | hidden          |
| attention_input              | normed input of the attention module              | hidden          |
| attention_output             | attention output after the out-projection         | hidden          |
| attention_value_output       | concatenated head outputs, before out-projection  | heads*head_dim  |
| head_attention_value_output  | the same, for a set of heads                      | |heads|*head_dim|
| query_output / key_output / value_output | q, k, v projections, before norm/RoPE  | heads*head_dim (k, v: kv_heads*head_dim) |
| head_query_output / head_key_output / head_value_output | the same, for a set of heads | |heads|*head_dim |
| mlp_input                    | normed input of the MLP                           | hidden          |
| mlp_activation               | MLP hidden after the non-linearity (gated: act(gate)*up) | intermediate |
| mlp_output                   | MLP output                                        | hidden          |

Key/value heads: with grouped-query attention, head indices of key/value streams range over
the model's key/value heads.

Families whose norms sit elsewhere keep the module meaning: OLMo2 has no norm before attention
or the MLP, so attention_input and mlp_input are un-normed residual streams there; Gemma2 and
OLMo2 norm the attention and MLP outputs before adding them, and attention_output / mlp_output
are before those norms; in GPT-NeoX (parallel residual) mlp_input is the normed block input.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import DasError
from .models import LoadedModel
from .names import HEAD_STREAMS, QKV_STREAMS, STREAM_TABLE, STREAMS


@dataclass(frozen=True)
class Site:
    stream: str
    layer: int
    module: nn.Module
    side: str  # "input" | "output"
    columns: Tensor  # indices into the hooked tensor's last dimension
    heads: tuple[int, ...] | None = None

    @property
    def width(self) -> int:
        return int(self.columns.numel())


def _module_side(lm: LoadedModel, stream: str) -> tuple[str, str]:
    """(module path inside a block, side) of a whole-vector stream, from the stream table and the family."""
    fam, row = lm.family, STREAM_TABLE[stream]
    if row.module == "qkv":
        return (fam.qkv[0] if len(fam.qkv) == 1 else fam.qkv[QKV_STREAMS.index(stream)]), row.side
    if row.side == "family":
        return getattr(fam, row.module)
    return (getattr(fam, row.module) if row.module else ""), row.side


def head_counts(lm: LoadedModel, stream: str) -> tuple[int, int]:
    """(number of heads, head dim) of a head-level stream's underlying tensor."""
    config = lm.config
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    base = HEAD_STREAMS.get(stream, stream)
    if base in ("key_output", "value_output"):
        n_heads = getattr(config, "num_key_value_heads", None) or n_heads
    return n_heads, head_dim


def _stream_columns(lm: LoadedModel, stream: str, module: nn.Module, side: str) -> Tensor:
    """The stream's columns of the hooked tensor, ordered head by head for q/k/v streams."""
    base = HEAD_STREAMS.get(stream, stream)
    if base in QKV_STREAMS and len(lm.family.qkv) == 1:
        n_heads, head_dim = head_counts(lm, base)
        which = QKV_STREAMS.index(base)
        if lm.family.qkv_layout == "per_head":  # [heads, 3, head_dim]: head h's q, k, v side by side
            head_starts = torch.arange(n_heads)[:, None] * 3 * head_dim + which * head_dim
            return (head_starts + torch.arange(head_dim)[None, :]).reshape(-1)
        width = n_heads * head_dim  # chunked: q | k | v
        return torch.arange(which * width, (which + 1) * width)
    return torch.arange(_tensor_width(lm, module, side))


_WIDTHS: "weakref.WeakKeyDictionary[nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def _tensor_width(lm: LoadedModel, module: nn.Module, side: str) -> int:
    """Last-dimension size of the hooked tensor, measured on a one-token forward once per module and side."""
    known = _WIDTHS.setdefault(module, {})
    if side not in known:
        known[side] = _measured_width(lm, module, side)
    return known[side]


def _measured_width(lm: LoadedModel, module: nn.Module, side: str) -> int:
    probe = Site(stream="probe", layer=0, module=module, side=side, columns=torch.arange(0))
    sizes: list[int] = []

    def grab(hidden: Tensor) -> None:
        sizes.append(hidden.shape[-1])
        raise _Stop

    with torch.no_grad(), hooked(probe, grab):
        try:
            lm.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=lm.device), use_cache=False)
        except _Stop:
            pass
    return sizes[0]


def resolve_site(lm: LoadedModel, stream: str, layer: int, heads: tuple[int, ...] | None = None) -> Site:
    """The site of `stream` at `layer`, restricted to `heads` for head-level streams."""
    if stream not in STREAMS:
        raise DasError(f"stream={stream}: unknown stream; valid choices: {', '.join(STREAMS)}")
    if not 0 <= layer < lm.n_layers:
        raise DasError(f"layers: layer {layer} is out of range; valid layers: 0..{lm.n_layers - 1}")
    path, side = _module_side(lm, HEAD_STREAMS.get(stream, stream))
    block = lm.block(layer)
    try:
        module = block.get_submodule(path) if path else block
    except AttributeError:
        raise DasError(f"stream={stream}: not available for model family of {lm.name}") from None
    columns = _stream_columns(lm, stream, module, side)
    if stream in HEAD_STREAMS:
        columns, heads = _head_columns(lm, stream, columns, heads)
    elif heads is not None:
        raise DasError(f"heads: stream={stream} is not head-level; head-level streams: {', '.join(HEAD_STREAMS)}")
    return Site(stream=stream, layer=layer, module=module, side=side, columns=columns, heads=heads)


def _head_columns(lm: LoadedModel, stream: str, columns: Tensor, heads) -> tuple[Tensor, tuple[int, ...]]:
    n_heads, head_dim = head_counts(lm, stream)
    heads = tuple(range(n_heads)) if heads is None else tuple(heads)
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise DasError(f"heads: {list(heads)} invalid for stream={stream}; valid heads: 0..{n_heads - 1}")
    if len(set(heads)) != len(heads):
        raise DasError(f"heads: {list(heads)} repeats a head for stream={stream}; give each head once")
    per_head = columns.view(n_heads, head_dim)
    return per_head[list(heads)].reshape(-1), heads


def gather(hidden: Tensor, positions: Tensor, columns: Tensor) -> Tensor:
    """hidden [B, T, D], positions [B, P], columns [C] -> [B, P*C] (positions concatenated)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None, None]
    picked = hidden[rows, positions[:, :, None], columns.to(hidden.device)[None, None, :]]
    return picked.reshape(hidden.shape[0], -1)


def scatter(hidden: Tensor, positions: Tensor, columns: Tensor, values: Tensor) -> Tensor:
    """A copy of `hidden` with `gather(hidden, positions, columns)` replaced by `values`."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None, None]
    out = hidden.clone()
    shape = (hidden.shape[0], positions.shape[1], columns.numel())
    out[rows, positions[:, :, None], columns.to(hidden.device)[None, None, :]] = values.reshape(shape).to(out.dtype)
    return out


@contextmanager
def hooked(site: Site, edit: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Within the block, `edit` sees the site's full tensor [B, T, D]; a returned tensor replaces it."""
    if site.side == "input":
        handle = site.module.register_forward_pre_hook(_input_hook(edit), with_kwargs=True)
    else:
        handle = site.module.register_forward_hook(_output_hook(edit))
    try:
        yield
    finally:
        handle.remove()


def _input_hook(edit):
    def hook(module, args, kwargs):
        if args:
            new = edit(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if torch.is_tensor(v))
        new = edit(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return hook


def _output_hook(edit):
    def hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = edit(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


class _Stop(Exception):
    pass


@torch.no_grad()
def read_sites(lm: LoadedModel, sites: list[Site], input_ids: Tensor) -> list[Tensor]:
    """Each site's columns at every position, [B, T, C]; one forward, stopped after the last site."""
    captured: dict[int, Tensor] = {}

    def grabber(i: int, site: Site):
        def grab(hidden: Tensor) -> None:
            captured[i] = hidden[..., site.columns.to(hidden.device)].detach()
            if len(captured) == len(sites):
                raise _Stop

        return grab

    with ExitStack() as stack:
        for i, site in enumerate(sites):
            stack.enter_context(hooked(site, grabber(i, site)))
        try:
            lm.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    return [captured[i] for i in range(len(sites))]


def read_site(lm: LoadedModel, site: Site, input_ids: Tensor) -> Tensor:
    """The site's columns at every position, [B, T, C]; the forward stops right after the site."""
    return read_sites(lm, [site], input_ids)[0]
