"""The docs site: ``mkdocs build --strict`` (the guide, the notebook with its outputs, the API
reference from the docstrings), a public function without a docstring failing it, and the built
home page and an API page opened in headless Chromium over a real HTTP server."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import shutil
import subprocess
import threading

import griffe
import pytest

from tiny import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    out = tmp_path_factory.mktemp("site")
    build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(out), strict=True))  # any warning aborts it
    return out


def test_the_site_has_every_page_the_api_reference_and_the_notebook_with_its_outputs(site):
    for page in ("index.html", "training/index.html", "convert-your-model/index.html", "api/index.html", "performance/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "model" / "index.html").read_text()
    for name in ("pureflax.nn.dense", "pureflax.vae.init", "pureflax.models.of"):
        assert f'id="{name}"' in api, name
    assert 'id="pureflax.compat.convert.migrate"' in (site / "api" / "compat" / "index.html").read_text()
    tutorial = (site / "tutorial" / "index.html").read_text()
    assert tutorial.count("data:image/png;base64") >= 2 and "restored bit for bit: True" in tutorial


def test_a_public_function_without_a_docstring_is_a_warning_that_fails_the_strict_build(tmp_path, monkeypatch, caplog):
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import griffe_pureflax
    finally:
        sys.path.remove(str(ROOT / "docs"))
    (tmp_path / "documented.py").write_text('"""A module."""\n\n\ndef said():\n    """Has one."""\n\n\ndef silent():\n    pass\n\n\n'
                                            'def _private():\n    pass\n')
    monkeypatch.setattr(griffe_pureflax, "DOCUMENTED", {"documented"})
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.pureflax"):
        griffe.load("documented", search_paths=[str(tmp_path)], extensions=griffe.load_extensions(griffe_pureflax.DocstringRequired))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].endswith("documented.py:8: function silent has no docstring"), messages


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def open_in_chromium(url, tmp_path, *mode):
    """Chromium's stdout and the page's console messages (Chromium logs each one on stderr as ``CONSOLE``)."""
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--log-level=0",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", *mode, url],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian's `chromium` package; .ci/run installs it where apt can)")
@pytest.mark.parametrize("page, expect", [("", "pure functions over PyTrees"), ("api/model/", "pureflax.nn.dense")])
def test_pages_render_in_chromium_with_no_console_errors(served, tmp_path, page, expect):
    dom, console = open_in_chromium(f"{served}/{page}", tmp_path, "--dump-dom")
    assert console == [], console
    assert expect in dom and 'class="md-nav' in dom  # the theme's navigation, built by its scripts and styles
    _, console = open_in_chromium(f"{served}/{page}", tmp_path, f"--screenshot={tmp_path / 'page.png'}")
    assert console == [] and (tmp_path / "page.png").stat().st_size > 20_000
