"""Every ```python block in docs/*.md and README.md runs, every relative link in the docs resolves,
and every shell command there runs as written after the README's first command.

Blocks of one page run in order in one namespace (a fresh dict per page), in this process,
with the working directory set to a temporary folder, so examples that write files write
there. A block preceded, on the line directly above its fence, by
``<!-- not executed -->`` is skipped. Pages are found at collection time: a new page in
docs/ is tested without editing this file.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import traceback
import types
from pathlib import Path
from typing import NamedTuple

import pytest
from tiny import ROOT, load_script

from pureflax.compat.convert import LAYOUTS

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]  # the README's examples run too
NOTEBOOK = DOCS / "tutorial.md"  # the notebook's text: tests/test_notebook.py runs it as the notebook it pairs with
SKIP_MARK = "<!-- not executed -->"
TORCH_MARK = "<!-- needs torch -->"  # run where torch is installed (as CI installs it), skipped elsewhere
HAS_TORCH = importlib.util.find_spec("torch") is not None
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}  # "": an unlabelled block (usage lines, transcripts)
CODE_SPAN = re.compile(r"`([^`]+)`")
# On a fresh machine with only python3, the README's first command makes .venv; after it, python,
# pip and pytest exist only as .venv/bin/..., and only there is pureflax importable.
BARE_TOOL = re.compile(r"(python3?|pip3?|pytest)\s")
ENV_ASSIGNMENT = re.compile(r"([A-Za-z_]\w*=\S*\s+)+")
SEPARATOR = re.compile(r"&&|\|\||[;|]")


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
        mark = lines[start - 1].strip() if start > 0 else ""
        skipped = mark == SKIP_MARK or (mark == TORCH_MARK and not HAS_TORCH)
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
    if page == NOTEBOOK:
        pytest.skip("run as docs/tutorial.ipynb by tests/test_notebook.py")
    monkeypatch.chdir(tmp_path)
    # The page's namespace is the dict of a module registered in sys.modules for the
    # duration of the test: dataclasses (Flax's TrainState subclasses) look their
    # module up there.
    module = types.ModuleType(f"pureflax_docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    saved = list(LAYOUTS)  # a page may register_layer: the next test sees the table as it was
    try:
        _run_blocks(page, namespace)
    finally:
        LAYOUTS[:] = saved


def _run_blocks(page, namespace):
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


class Command(NamedTuple):
    line: int  # 1-based line of the page where the command is written
    text: str


def shell_commands(text: str) -> list[Command]:
    """Every command in the page's shell blocks and inline code spans, split at && || ; and |.

    A ```console block's commands are its ``$ `` lines; in other shell blocks every line is one,
    with a ``$ `` prompt dropped and a ``#`` comment cut off. An inline span is one line, however it wraps.
    """
    found: list[tuple[int, str]] = []
    prose = []  # the page with its fenced blocks blanked out, line for line
    lang = fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang = match.group(1), match.group(2).lower()
            prose.append("")
        elif fence is not None and line.startswith(fence):
            fence = None
            prose.append("")
        elif fence is not None:
            prose.append("")
            if lang in SHELL_LANGS and (lang != "console" or line.startswith("$ ")):
                found.append((number, re.sub(r"(^|\s)#.*", "", line.removeprefix("$ "))))
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for span in CODE_SPAN.finditer(joined):
        found.append((joined.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())))
    commands = []
    for number, line in found:
        for part in SEPARATOR.split(line):
            part = ENV_ASSIGNMENT.sub("", part.strip(), count=1)  # X=1 python ... runs python
            if part:
                commands.append(Command(number, part))
    return commands


def test_shell_command_parser_finds_blocks_spans_and_chains():
    text = "\n".join([
        "Run `python scripts/a.py` or `.venv/bin/python -m pytest`, with `python3`.",
        "```bash", "python3 -m venv .venv && .venv/bin/pip install . && python b.py  # python c.py", "```",
        "```console", "$ X=1 python d.py", "python: output, not a command", "```",
        "```python", "python = 1", "```",
    ])
    assert shell_commands(text) == [
        Command(3, "python3 -m venv .venv"), Command(3, ".venv/bin/pip install ."), Command(3, "python b.py"),
        Command(6, "python d.py"), Command(1, "python scripts/a.py"), Command(1, ".venv/bin/python -m pytest"),
        Command(1, "python3"),
    ]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_commands_use_the_venv(page):
    bare = [
        f"{page.relative_to(DOCS.parent)}:{c.line}: {c.text}"
        for c in shell_commands(page.read_text())
        if BARE_TOOL.match(c.text) and not c.text.startswith("python3 -m venv ")
    ]
    assert not bare, (
        "commands that fail on a fresh machine with only python3 (no `python`, and pureflax is "
        "installed only in .venv); write .venv/bin/python, .venv/bin/pip:\n" + "\n".join(bare)
    )


def test_resume_hint_names_the_running_interpreter(tmp_path, monkeypatch):
    """What train.py prints on Ctrl-C runs as written: this interpreter, not a bare ``python``."""
    resume_command = load_script("train").resume_command
    argv = ["--out", "runs/my vae", "--resume", "--max-steps", "9"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "executable", str(ROOT / ".venv" / "bin" / "python"))
    assert resume_command(argv) == ".venv/bin/python scripts/train.py --out 'runs/my vae' --max-steps 9 --resume"
    monkeypatch.chdir(tmp_path)  # elsewhere, both paths in full
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    script = shlex.quote(str(ROOT / "scripts" / "train.py"))
    assert resume_command(argv) == f"'/opt/my python/bin/python3' {script} --out 'runs/my vae' --max-steps 9 --resume"
