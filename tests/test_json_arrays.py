"""`.json` dataset files: JSON lines or one JSON array of objects, pretty-printed or not; errors stay
one line naming the line an object starts on."""

import json

import pytest
from test_filedata import EXPECTED, ROWS, load, nested, tokenizer  # noqa: F401 (fixture)

from das_cli.errors import DasError


@pytest.mark.parametrize("indent", [None, 2], ids=["one_line", "pretty"])
def test_a_json_array_reads_like_json_lines(tokenizer, tmp_path, indent):  # noqa: F811
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([nested(r) for r in ROWS], indent=indent) + "\n")
    assert load(tokenizer, path) == EXPECTED


@pytest.mark.parametrize(
    "text,message",
    [
        ('[\n  {"base": "a", "source": "b", "label": " c"},\n  {"base": "a" "source": "b"}\n]\n', r"line 3: not valid JSON \(Expecting ',' delimiter"),
        ('[\n  {"base": "a", "source": "b", "label": " c"},\n  3\n]\n', r"line 3: expected a JSON object .* got int"),
        ('[\n  {"base": "a", "source": "b", "label": " c"}\n  {"base": "a"}\n]\n', r"line 3: not valid JSON \(expected ',' or '\]'"),
        ('[\n  {"base": "a", "source": "b", "label": " c"},\n', r"line 3: not valid JSON \(the array has no closing '\]'\)"),
        ('[{"base": "a", "source": "b", "label": " c"}]\n[]\n', r"line 2: not valid JSON \(text after the closing '\]'\)"),
    ],
    ids=["bad_object", "not_an_object", "no_comma", "unclosed", "trailing"],
)
def test_array_errors_are_one_line_with_the_line(tokenizer, tmp_path, text, message):  # noqa: F811
    path = tmp_path / "pairs.json"
    path.write_text(text)
    with pytest.raises(DasError, match=f"dataset.path={path} {message}") as error:
        load(tokenizer, path)
    assert "\n" not in str(error.value)
