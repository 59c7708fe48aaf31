"""Griffe extensions for the docs site (``mkdocs.yml`` loads them for mkdocstrings).

- ``pureflax.compat`` lives in ``compat/`` at the repository's top level (pyproject's
  ``package-dir`` maps it), so griffe, which finds submodules by their folder, is shown it
  under ``pureflax``.
- A public function, method or class of a module the API reference documents (the ``::: module``
  lines of ``docs/api/``) without a docstring is a warning, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import griffe

COMPAT = Path(__file__).resolve().parents[1] / "compat"
API = Path(__file__).resolve().parent / "api"
DOCUMENTED = {line.split()[1] for page in API.glob("*.md") for line in page.read_text().splitlines() if line.startswith("::: ")}
logger = logging.getLogger("mkdocs.plugins.pureflax")


def public(obj: griffe.Object) -> bool:
    """Whether ``obj`` and every parent up to its module is public (no leading underscore)."""
    while obj is not None and not obj.is_module:
        if obj.name.startswith("_"):
            return False
        obj = obj.parent
    return True


class CompatPackage(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "pureflax" or "compat" in pkg.members:
            return
        sub = griffe.GriffeLoader(extensions=loader.extensions, docstring_parser=loader.docstring_parser,
                                  docstring_options=loader.docstring_options, search_paths=[str(COMPAT.parent)],
                                  modules_collection=loader.modules_collection, lines_collection=loader.lines_collection)
        compat = sub.load("compat")
        del loader.modules_collection["compat"]
        pkg.set_member("compat", compat)


class DocstringRequired(griffe.Extension):
    def _check(self, obj: griffe.Object) -> None:
        module = obj.module.path.replace("compat", "pureflax.compat", 1) if obj.module.path.startswith("compat") else obj.module.path
        if public(obj) and not obj.docstring and module in DOCUMENTED:
            logger.warning("%s:%s: %s %s has no docstring", obj.relative_filepath, obj.lineno, obj.kind.value, obj.name)

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        if not func.overloads and "property" not in func.labels:
            self._check(func)

    def on_class_instance(self, *, cls: griffe.Class, **kwargs) -> None:
        self._check(cls)
