"""Valid names the config refers to, in a module that imports nothing heavy (no torch, no transformers),
so that validating a config and `das-cli --help` stay fast. The modules that implement them import them from here.

`STREAM_TABLE` holds every fact about a stream in one row: which module of a block it hooks (a
model family's attribute naming that module's path), the side of that module (its input or its
output), the whole-vector stream a head-level stream slices, and the projection that reads it
(the illusion check splits a subspace by that projection's rowspace).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stream:
    module: str  # the family attribute naming the hooked module ("": the block itself; "qkv": the q/k/v projections)
    side: str  # "input" | "output" of that module ("family": the family says, as for the MLP activation)
    heads_of: str | None = None  # head-level streams: the stream whose heads they select
    read_by: str | None = None  # the family attribute of the projection that reads the stream (illusion split)


STREAM_TABLE: dict[str, Stream] = {
    "block_input": Stream("", "input"),
    "block_output": Stream("", "output"),
    "attention_input": Stream("attention", "input"),
    "attention_output": Stream("attention", "output"),
    "attention_value_output": Stream("attention_out_proj", "input", read_by="attention_out_proj"),
    "query_output": Stream("qkv", "output"),
    "key_output": Stream("qkv", "output"),
    "value_output": Stream("qkv", "output"),
    "mlp_input": Stream("mlp", "input"),
    "mlp_activation": Stream("mlp_activation", "family", read_by="mlp_out_proj"),
    "mlp_output": Stream("mlp", "output"),
    "head_attention_value_output": Stream("attention_out_proj", "input", "attention_value_output", "attention_out_proj"),
    "head_query_output": Stream("qkv", "output", "query_output"),
    "head_key_output": Stream("qkv", "output", "key_output"),
    "head_value_output": Stream("qkv", "output", "value_output"),
}
STREAMS = tuple(STREAM_TABLE)
HEAD_STREAMS = {name: s.heads_of for name, s in STREAM_TABLE.items() if s.heads_of}
ILLUSION_STREAMS = tuple(name for name, s in STREAM_TABLE.items() if s.read_by)
QKV_STREAMS = ("query_output", "key_output", "value_output")
ENGINES = ("fast", "reference")
CONTROLS = ("none", "random_model", "shuffled_labels")  # analysis.control (controls.py)
