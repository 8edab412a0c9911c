"""Valid names the config refers to, in a module that imports nothing heavy (no torch, no transformers),
so that validating a config and `das-cli --help` stay fast. The modules that implement them import them from here."""

HEAD_STREAMS = {
    "head_attention_value_output": "attention_value_output",
    "head_query_output": "query_output",
    "head_key_output": "key_output",
    "head_value_output": "value_output",
}
STREAMS = (
    "block_input",
    "block_output",
    "attention_input",
    "attention_output",
    "attention_value_output",
    "query_output",
    "key_output",
    "value_output",
    "mlp_input",
    "mlp_activation",
    "mlp_output",
    *HEAD_STREAMS,
)
ENGINES = ("fast", "reference")
