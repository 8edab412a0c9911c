"""The documentation against the repository: every shipped config is named in it, every relative link
resolves (files and #anchors), the README stays short and opens with the install and test commands.

Reads files only (no torch, no das_cli import), so it runs in well under a second.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
DOCS = sorted(DOCS_DIR.glob("*.md"))
# the pages whose relative links must resolve
LINKED = [README, *DOCS, ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
# conf/<group>/*.yaml: each file's stem is a name users type (model=gpt2, hydra/launcher=slurm)
CONFIG_GROUPS = ("model", "dataset", "intervention", "hydra/launcher")
MAX_README_LINES = 300

FENCE = re.compile(r"(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)  # a code span; never across a blank line
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:


def blocks(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, fenced code blocks) of a markdown text."""
    prose: list[str] = []
    code: list[str] = []
    fence: str | None = None
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None:
            opening = FENCE.match(stripped)
            if opening and len(line) - len(stripped) <= 3:
                fence, current = opening.group(1), []
            else:
                prose.append(line)
        elif re.fullmatch(re.escape(fence[0]) + "{%d,}[ \t]*" % len(fence), stripped):
            code.append("\n".join(current))
            fence = None
        else:
            current.append(line)
    if fence is not None:  # an unclosed fence runs to the end of the file, as in CommonMark
        code.append("\n".join(current))
    return prose, code


def prose_and_code(text: str) -> tuple[str, str]:
    """The text outside code, with code spans blanked out, and all code (fenced blocks and spans) joined."""
    prose_lines, fenced = blocks(text)
    prose = "\n".join(prose_lines)
    spans = [m.group(2) for m in INLINE_CODE.finditer(prose)]
    return INLINE_CODE.sub(" ", prose), "\n".join(fenced + spans)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    prose, _ = blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(out)


def relative_links(path: Path) -> list[str]:
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in MARKDOWN_LINK.finditer(prose)] + [m.group(1) for m in HTML_LINK.finditer(prose)]
    return [t for t in targets if not EXTERNAL.match(t)]


def link_problem(page: Path, target: str) -> str | None:
    """Why `target`, a relative link on `page`, does not resolve; None when it does."""
    file_part, _, anchor = target.partition("#")
    resolved = (page.parent / file_part).resolve() if file_part else page
    if resolved != ROOT and ROOT not in resolved.parents:
        return f"{target}: points outside the repository"
    if not resolved.exists():
        return f"{target}: {resolved.relative_to(ROOT)} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}"
    return None


# --- every shipped config is named in the docs ---------------------------------------------------


def shipped_configs() -> list[tuple[str, str]]:
    return sorted((group, path.stem) for group in CONFIG_GROUPS for path in (CONF / group).glob("*.yaml"))


def test_every_config_group_ships_configs():
    groups = {group for group, _ in shipped_configs()}
    assert groups == set(CONFIG_GROUPS), f"no YAML in conf/{set(CONFIG_GROUPS) - groups}"


def test_every_shipped_config_is_named_in_the_docs():
    """Each conf/model, conf/dataset, conf/intervention and conf/hydra/launcher YAML's name appears as code
    (`model=tiny_gemma2`, a table cell `tiny_gemma2`) in README.md or docs/*.md; `tiny_gemma` inside
    `tiny_gemma2` or `das` inside `das-cli` does not count."""
    code = "\n".join(prose_and_code(page.read_text(encoding="utf-8"))[1] for page in [README, *DOCS])
    missing = [f"conf/{group}/{name}.yaml" for group, name in shipped_configs()
               if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", code)]
    assert not missing, f"shipped configs the docs never name (as code): {', '.join(missing)}"


# --- links ---------------------------------------------------------------------------------------


def test_the_linked_pages_exist():
    missing = [str(page.relative_to(ROOT)) for page in LINKED if not page.exists()]
    assert not missing and DOCS, f"missing documentation pages: {missing or 'docs/*.md'}"


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    if not page.exists():
        pytest.fail(f"{page.relative_to(ROOT)} does not exist")
    problems = [p for p in (link_problem(page, t) for t in relative_links(page)) if p]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_every_docs_page_is_linked_from_the_index_and_the_readme():
    pages = [page for page in DOCS if page.name != "README.md"]
    index = {(DOCS_DIR / t.partition("#")[0]).resolve() for t in relative_links(DOCS_DIR / "README.md")}
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert pages, "no pages in docs/"
    assert not [p.name for p in pages if p not in index], "docs/README.md does not list every page"
    assert not [p.name for p in pages if p not in readme], "README.md does not link every docs page"
    assert DOCS_DIR / "README.md" in readme


# --- the README ----------------------------------------------------------------------------------


def test_readme_is_at_most_300_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_readme_opens_with_the_install_and_test_commands():
    _, code = blocks(README.read_text(encoding="utf-8"))
    assert code, "README.md has no code block"
    first = code[0]
    assert "das-cli" in first and "python -m pytest" in first, f"README's first code block:\n{first}"


# --- the checker itself --------------------------------------------------------------------------


def test_the_checker_finds_broken_links_and_missing_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Top\n\n## Speed: the fast `engine`\n\n```\n[not a link](nowhere.md)\n```\n"
                                   "[ok](a.md#speed-the-fast-engine) [self](#top) [gone](b.md) [bad](a.md#nope)"
                                   " `[code](x.md)` [web](https://example.org) [up](../outside.md)\n")
    page = tmp_path / "a.md"
    targets = relative_links(page)
    assert targets == ["a.md#speed-the-fast-engine", "#top", "b.md", "a.md#nope", "../outside.md"]
    problems = {t: link_problem(page, t) for t in targets}
    assert problems["a.md#speed-the-fast-engine"] is None and problems["#top"] is None
    assert "does not exist" in problems["b.md"] and "no heading" in problems["a.md#nope"]
    assert "outside the repository" in problems["../outside.md"]
