"""Match two sides' layers: by name where both agree, else by order within each kind, shapes as constraints.

:func:`match` returns a :class:`Plan`; ``print(plan)`` is the table a user reads: each source
layer, the target layer it fills, what moves how, the shapes and the settings compared. An
impossible match is refused naming both sides' candidates and the ``names=`` line that settles it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pureflax.compat.convert.layers import FAMILIES, Layer
from pureflax.compat.convert.trees import ConversionError


class Pair(NamedTuple):
    source: Layer
    target: Layer
    how: str  # 'name', 'names=', 'order', 'shape' (order within the layers of one shape: a guess the outputs must confirm)
    flatten: tuple[int, int, int] | None = None  # (H, W, C) where one side flattens C first and the other last
    checked: str = ""  # the settings compared, as the table prints them


class Plan(NamedTuple):
    """How each layer of the source fills a layer of the target."""

    pairs: tuple[Pair, ...]
    source_form: str
    target_form: str

    def __str__(self) -> str:
        head = f"{self.source_form} -> {self.target_form}: {len(self.pairs)} layers\n"
        rows = [("source", "target", "kind", "matched by", "moved", "shapes", "settings")]
        for p in self.pairs:
            moves = _moves(p)
            shapes = ", ".join(f"{n} {'x'.join(map(str, s)) or 'scalar'}" for n, s in p.source.shapes)
            rows.append((p.source.path or "(top)", p.target.path or "(top)", p.target.kind if "|" not in p.target.kind else p.source.kind,
                         p.how, moves, shapes, p.checked or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return head + "\n".join(lines)

    def names(self) -> dict[str, str]:
        """``{target layer path: the source's functional path}``: the target's ``names=`` for the move."""
        # '' is a model that is one layer; two such need no name
        return {p.target.path: "/".join(p.source.default) for p in self.pairs if p.target.path or p.source.default}


def _moves(p: Pair) -> str:
    """What each side's rule does to the arrays, as the table prints it."""
    parts = []
    for side, layer in (("source", p.source), ("target", p.target)):
        if layer.row is not None:
            for attr, name, rule in layer.row.params:
                if rule.name != "as is":
                    parts.append(f"{side} {attr}: {rule.name.split(' ')[0]}")
    if p.flatten:
        parts.append(f"rows C,H,W <-> H,W,C {p.flatten}")
    return "; ".join(parts) or "as is"


def _family(layer: Layer, loose: set[str]) -> str:
    family = FAMILIES.get(layer.kind, layer.kind)
    return family if family in loose else layer.kind


def _shapes(layer: Layer) -> tuple:
    return tuple(sorted(layer.shapes))


def _describe(layers: list[Layer]) -> str:
    return ", ".join(f"{l.path} {dict(l.shapes).get('kernel', dict(l.shapes).get('scale', dict(l.shapes).get('embedding', ())))}"
                     for l in layers[:12]) + (" ..." if len(layers) > 12 else "")


def _refuse(kind: str, sources: list[Layer], targets: list[Layer], why: str) -> None:
    hint = ""
    if sources and targets:
        hint = f"; settle it with names={{{targets[0].path!r}: {sources[0].path!r}, ...}} (target layer: source layer)"
    raise ConversionError(f"{kind} layers: {why}\n  source: {_describe(sources)}\n  target: {_describe(targets)}{hint}")


def _order_how(source: Layer, target: Layer, sources: list[Layer], targets: list[Layer]) -> str:
    """'order', or 'keys' where a side's order is a mapping's keys (perhaps sorted, not called) with
    other layers of this kind and shape: then only outputs or names= can confirm the pair."""
    for layer, side in ((source, sources), (target, targets)):
        if layer.keyed and sum(_shapes(other) == _shapes(layer) for other in side) > 1:
            return "keys"
    return "order"


def _by_order(kind: str, sources: list[Layer], targets: list[Layer]) -> list[Pair]:
    if len(sources) != len(targets):
        _refuse(kind, sources, targets, f"the source has {len(sources)} and the target {len(targets)}")
    if all(_shapes(s) == _shapes(t) for s, t in zip(sources, targets)):
        return [Pair(s, t, _order_how(s, t, sources, targets)) for s, t in zip(sources, targets)]
    groups: dict[tuple, tuple[list, list]] = {}
    for layer in sources:
        groups.setdefault(_shapes(layer), ([], []))[0].append(layer)
    for layer in targets:
        groups.setdefault(_shapes(layer), ([], []))[1].append(layer)
    pairs = []
    for shape, (s, t) in groups.items():
        if len(s) != len(t):
            _refuse(kind, sources, targets, f"in order their shapes differ, and {len(s)} source and {len(t)} target layers have "
                    f"shapes {dict(shape)}")
        how = "shape" if len(s) == 1 else "shape, then order"
        pairs += [Pair(a, b, how) for a, b in zip(s, t)]
    return sorted(pairs, key=lambda p: p.target.order)


def match(sources: list[Layer], targets: list[Layer], names: Mapping[str, str] | None, source_form: str,
          target_form: str) -> Plan:
    """Pair every target layer with one source layer (``names``: target path -> source path, pinned)."""
    by_path = {l.path: l for l in sources}
    by_target = {l.path: l for l in targets}
    pairs: list[Pair] = []
    for target_path, source_path in (names or {}).items():
        if target_path not in by_target or source_path not in by_path:
            missing, side, have = ((target_path, "target", by_target) if target_path not in by_target
                                   else (source_path, "source", by_path))
            raise ConversionError(f"names: {missing!r} is not a layer of the {side}; its layers: {sorted(have)[:30]}")
        pairs.append(Pair(by_path[source_path], by_target[target_path], "names="))
    taken_s, taken_t = {p.source.path for p in pairs}, {p.target.path for p in pairs}
    rest_s = [l for l in sources if l.path not in taken_s]
    rest_t = [l for l in targets if l.path not in taken_t]
    by_default = {l.default: l for l in rest_s}
    for layer in list(rest_t):
        twin = by_default.get(layer.default)
        if twin is not None and _shapes(twin) == _shapes(layer):
            pairs.append(Pair(twin, layer, "name"))
            rest_s.remove(twin)
            rest_t.remove(layer)
    loose = {l.kind for l in rest_s + rest_t if "|" in l.kind}
    kinds: dict[str, tuple[list[Layer], list[Layer]]] = {}
    for layer in sorted(rest_s, key=lambda l: l.order):
        kinds.setdefault(_family(layer, loose), ([], []))[0].append(layer)
    for layer in sorted(rest_t, key=lambda l: l.order):
        kinds.setdefault(_family(layer, loose), ([], []))[1].append(layer)
    for kind, (s, t) in kinds.items():
        pairs += _by_order(kind, s, t)
    for p in pairs:
        a, b = p.source.kind, p.target.kind
        if "|" not in a + b and a != b:
            raise ConversionError(f"{p.source.path} is a {a} but {p.target.path}, matched with it ({p.how}), is a {b}")
    return Plan(tuple(sorted(pairs, key=lambda p: p.target.order)), source_form, target_form)


def ambiguous(plan: Plan) -> list[Pair]:
    """The pairs matched by shape among several layers of one shape: only outputs can confirm them."""
    return [p for p in plan.pairs if p.how in ("shape, then order", "keys")]


def refuse_unconfirmed(plan: Plan) -> None:
    found = ambiguous(plan)
    if found:
        how = ("in the order of a dict's keys (sorted, perhaps, not called)" if found[0].how == "keys"
               else "by shape and then order")
        raise ConversionError(
            f"{found[0].source.kind} layers: matched {how} ({found[0].source.path} -> {found[0].target.path}, ...), which only "
            "the outputs can confirm: pass example= (a batch as the source takes it; Linen variables as the bound module, "
            f"module.bind(variables)), or names={{{found[0].target.path!r}: {found[0].source.path!r}, ...}}"
        )
