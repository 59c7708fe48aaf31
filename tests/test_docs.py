"""Every ```python block in docs/*.md and README.md runs, and every relative link in the docs resolves.

Blocks of one page run in order in one namespace (a fresh dict per page), in this process,
with the working directory set to a temporary folder, so examples that write files write
there. A block preceded, on the line directly above its fence, by
``<!-- not executed -->`` is skipped. Pages are found at collection time: a new page in
docs/ is tested without editing this file.
"""

from __future__ import annotations

import re
import sys
import traceback
import types
from pathlib import Path
from typing import NamedTuple

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]  # the README's examples run too
SKIP_MARK = "<!-- not executed -->"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


class Block(NamedTuple):
    number: int  # 1-based among the page's executed python blocks
    line: int  # 1-based line of the opening fence
    code: str


def python_blocks(text: str) -> list[Block]:
    """The page's executed ```python blocks, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start + 1}: a code fence is never closed")
        i += 1  # past the closing fence
        skipped = start > 0 and lines[start - 1].strip() == SKIP_MARK
        if lang == "python" and not skipped:
            blocks.append(Block(len(blocks) + 1, start + 1, "\n".join(body) + "\n"))
    return blocks


def test_pages_are_found():
    names = {page.name for page in PAGES}
    assert {"index.md", "functional.md", "equinox.md", "flax.md", "tutorial-map.md"} <= names


def test_block_parser_skips_marked_and_non_python_blocks():
    text = "\n".join(
        ["```python", "a = 1", "```", SKIP_MARK, "```python", "b = 2", "```", "```bash", "c", "```", "```python", "d = 3", "```"]
    )
    assert [(b.number, b.line, b.code) for b in python_blocks(text)] == [(1, 1, "a = 1\n"), (2, 11, "d = 3\n")]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The page's namespace is the dict of a module registered in sys.modules for the
    # duration of the test: dataclasses (Flax's TrainState subclasses) look their
    # module up there.
    module = types.ModuleType(f"pureflax_docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for block in python_blocks(page.read_text()):
        where = f"docs/{page.name} block {block.number} (line {block.line})"
        try:
            code = compile(block.code, where, "exec")
            exec(code, namespace)
        except Exception:
            pytest.fail(f"{where} failed:\n{block.code}\n{traceback.format_exc()}", pytrace=False)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the page's headings (code blocks skipped)."""
    found, fence = set(), None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and fence is None:
            fence = match.group(1)
        elif fence is not None and line.startswith(fence):
            fence = None
        elif fence is None and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = page.parent / path if path else page
        assert linked.exists(), f"docs/{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), f"docs/{page.name} links to {target}: no such heading"
