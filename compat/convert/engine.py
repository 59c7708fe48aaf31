"""``migrate(source, like)``: any model, any two forms, in one call — matched, checked, moved, verified.

1. Walk both sides into layers (:mod:`.layers`); 2. match them (:mod:`.plan`); 3. compare every
pair's settings and, with ``example=``, both models' outputs (:mod:`.checks`); 4. move the values
through each side's layout rules, optimiser state and BatchNorm statistics with the params
(:mod:`.containers`). A Dense after a flatten of a feature map, where one side flattens channels
first and the other last, gets its rows in the order that reproduces the outputs on ``example=``,
or ``flatten=``'s; without either it is refused, never guessed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

from pureflax.compat.convert import checks, containers, pytorch, trace
from pureflax.compat.convert.api import from_functional, to_functional, variables_from_functional, variables_to_functional
from pureflax.compat.convert.containers import Options
from pureflax.compat.convert.layers import Layer
from pureflax.compat.convert.plan import Pair, Plan, match, refuse_unconfirmed
from pureflax.compat.convert.trees import ConversionError

Calls = tuple[Callable[[Any, Any], Any] | None, Callable[[Any, Any], Any] | None]
_SETTINGS_MATTER = ("Conv", "ConvTranspose", "LayerNorm", "GroupNorm", "BatchNorm", "Conv|ConvTranspose", "LayerNorm|GroupNorm")


def _channels_before(found: list[Layer], layer: Layer) -> tuple[int, bool] | None:
    """The channels of the feature map the layer just before ``layer`` gives, and whether it orders them first."""
    before = [l for l in found if l.order < layer.order]
    if not before:
        return None
    last = max(before, key=lambda l: l.order)
    shapes = dict(last.shapes)
    if last.kind in ("Dense", "Embed") or ("kernel" not in shapes and "scale" not in shapes and "bias" not in shapes):
        return None
    channels = shapes["kernel"][-1] if "kernel" in shapes else (shapes.get("scale") or shapes["bias"])[0]
    return channels, last.row is not None and last.row.channels_first


def declares_hwc(obj: Any) -> bool:
    """An Equinox model whose class says it flattens (H, W, C), as Linen does: ``flatten_order = "HWC"``."""
    return getattr(type(checks.module_of(obj)), "flatten_order", None) == "HWC"


def _unsettled(plan: Plan, sources: list[Layer], targets: list[Layer], hwc: tuple[bool, bool]) -> list[tuple[Pair, int, bool]]:
    """Dense pairs after a flatten of C channels that one side orders C first: (pair, C, the source is that side).

    ``hwc``: whether the source, the target, declares that it flattens as Linen does.
    """
    out = []
    for pair in plan.pairs:
        if pair.source.kind != "Dense":
            continue
        before = _channels_before(sources, pair.source), _channels_before(targets, pair.target)
        if None in before:
            continue
        rows, (channels, source_first), (_, target_first) = dict(pair.source.shapes)["kernel"][0], before[0], before[1]
        declared = hwc[0] if source_first else hwc[1]
        if rows != channels and rows % channels == 0 and source_first != target_first and not declared:
            out.append((pair, channels, source_first))
    return out


def _candidates(rows: int, channels: int) -> list[tuple[int, int, int]]:
    """(H, W, C) with H·W·C = rows, square first."""
    hw = rows // channels
    found = [(h, hw // h, channels) for h in range(1, hw + 1) if hw % h == 0]
    return sorted(found, key=lambda c: abs(c[0] - c[1]))


def _options(plan: Plan, flattens: Mapping[str, tuple[tuple | None, bool]]) -> tuple[Options, Options]:
    """The source's and the target's options for the move: the target named after the source, the flattens."""
    by_target = {p.target.path: p for p in plan.pairs}
    source_flatten = {"/".join(by_target[t].source.default): hwc for t, (hwc, first) in flattens.items() if first and hwc}
    target_flatten = {"/".join(by_target[t].source.default): hwc for t, (hwc, first) in flattens.items() if not first and hwc}
    return Options(None, source_flatten or None), Options(plan.names(), target_flatten or None)


def _user_flatten(plan: Plan, flatten: Mapping[str, Any], unsettled: list) -> dict[str, tuple[tuple | None, bool]]:
    known = {}
    for pair, _, first in unsettled:
        for path in (pair.target.path, pair.source.path):
            if path in flatten:
                known[pair.target.path] = (tuple(flatten[path]), first)
    extra = set(flatten) - {p for pair, _, _ in unsettled for p in (pair.target.path, pair.source.path)}
    if extra:
        raise ConversionError(f"flatten: {sorted(extra)} name no Dense layer that follows a flatten whose order the two "
                              f"forms disagree on; those are: {[pair.target.path for pair, _, _ in unsettled] or 'none'}")
    return known


def plan(source: Any, like: Any, *, example: Any = None, call: Calls | None = None, names: Mapping[str, str] | None = None,
         flatten: Mapping[str, Any] | None = None) -> Plan:
    """The match :func:`migrate` would make: ``print(plan(...))`` shows it, layer by layer.

    Arguments as for :func:`migrate`; settings are compared (a difference raises), outputs are not.
    """
    found, sources, targets = _prepare(source, like, example, call, names)[:3]
    unsettled = _unsettled(found, sources, targets, (declares_hwc(source), declares_hwc(like)))
    known = _user_flatten(found, dict(flatten or {}), unsettled)
    return found._replace(pairs=tuple(p._replace(flatten=known[p.target.path][0]) if p.target.path in known else p
                                      for p in found.pairs))


def _prepare(source: Any, like: Any, example: Any, call: Calls | None, names: Mapping[str, str] | None):
    calls = tuple(fn or checks.default_call for fn in (call or (None, None)))
    sources = running("source", lambda: checks.side_layers(source, example, calls[0]))
    source_first = checks.channels_first(sources)
    targets = checks.side_layers(like)
    if example is not None:  # traced on the example as the target takes it
        like_example = checks.move_channels(example, source_first, checks.channels_first(targets))
        targets = running("target", lambda: checks.side_layers(like, like_example, calls[1]))
    result = match(sources, targets, names, checks.form_of(source), checks.form_of(like))
    pairs = tuple(p._replace(checked=checks.compare_settings(p.target.path or "the model", p.source, p.target)) for p in result.pairs)
    return result._replace(pairs=pairs), sources, targets, calls, source_first, checks.channels_first(targets)


def migrate(source: Any, like: Any, *, example: Any = None, call: Calls | None = None, names: Mapping[str, str] | None = None,
            flatten: Mapping[str, Any] | None = None, tolerance: float = 1e-4, expected: Any = None,
            settings: str = "check") -> Any:
    """``source`` in ``like``'s form: layers matched by structure, settings compared, outputs verified on ``example``.

    Args:
        source: a model in any form: functional params or a ``pureflax.TrainState``; Linen variables,
            a bound Linen module (``module.bind(variables)``) or a Flax ``TrainState``; an NNX module
            or ``(model, nnx.Optimizer)``; an Equinox module, ``(model, eqx.nn.State)`` or ``(model, opt_state)``.
        like: the form wanted, in any of those containers; its arrays may be abstract (``eqx.filter_eval_shape``).
        example: a batch as the source takes it. Both models then run after the conversion (its
            channels moved for a form whose convolutions take them first) and must agree within
            ``tolerance``; it also settles a flatten order and confirms a match by shape.
        call: ``(source_fn, like_fn)``, each ``fn(model, batch)`` (``None``: that side's default), where a
            plain call does not fit (``train=False``, a state argument); Equinox's default is ``jax.vmap(model)(batch)``.
        names: ``{target layer path: source layer path}`` pinning pairs the match cannot settle.
        flatten: ``{Dense path (either side): (H, W, C)}`` of the feature map flattened before it,
            where one side flattens channels first and the other last.
        tolerance: the largest output difference accepted, relative to the source's largest output.
        expected: the source's outputs on ``example``, for a source that cannot run here (a torch state_dict
            without its module): the target's are compared with them.
        settings: ``"check"``; or ``"trust"``, to accept layers whose settings cannot be seen on one side
            (a bare state_dict, Linen variables) and a target that cannot be run (a state_dict without
            torch): the example, if given, still orders the calls.

    Returns:
        A new object of ``like``'s form holding ``source``'s values, optimiser state and model state included.

    Raises:
        ConversionError: an impossible or unconfirmed match, a setting that differs, a flatten
            order that cannot be known, outputs that differ (naming the first layer that does).
    """
    found, sources, targets, calls, source_first, target_first = _prepare(source, like, example, call, names)
    unsettled = _unsettled(found, sources, targets, (declares_hwc(source), declares_hwc(like)))
    known = _user_flatten(found, dict(flatten or {}), unsettled)
    open_pairs = [(pair, channels, first) for pair, channels, first in unsettled if pair.target.path not in known]
    if settings not in ("check", "trust"):
        raise ConversionError(f"settings={settings!r}: pass 'check' or 'trust'")
    if example is None or checks.runnable(like) is None:  # nothing will show the outputs: nothing may be guessed
        _refuse_unproven(found, open_pairs, trust=settings == "trust")
    _refuse_dropped_optimiser(source, like)
    choices = [[(c, first) for c in _flatten_candidates(pair, channels)] for pair, channels, first in open_pairs]
    error = None
    for combo in itertools.islice(itertools.product(*choices), 64):
        flattens = dict(known) | {pair.target.path: choice for (pair, _, _), choice in zip(open_pairs, combo)}
        moved = _move(source, like, found, flattens)
        if example is None or (settings == "trust" and checks.runnable(moved) is None):
            return moved  # nothing to run the target on: the example ordered the calls, the settings are trusted
        try:
            _verify(found, source, moved, example, call, (source_first, target_first), tolerance, expected)
            return moved
        except ConversionError as err:
            error = error or err
    raise error


def _refuse_unproven(found: Plan, open_pairs: list, trust: bool) -> None:
    """Without an example: what only outputs could prove is refused, naming what settles it."""
    refuse_unconfirmed(found)
    if open_pairs:
        pair = open_pairs[0][0]
        raise ConversionError(
            f"{pair.source.path} -> {pair.target.path}: a Dense after a flatten of a feature map, which one form orders "
            f"channels first and the other last: pass example= (a batch as the source takes it) to settle it by the "
            f"outputs, or flatten={{{pair.target.path!r}: (H, W, C)}}")
    unseen = [p for p in found.pairs if p.source.kind in _SETTINGS_MATTER and p.checked in ("not visible", "-")]
    if unseen and not trust:
        side = found.source_form if unseen[0].source.settings is None else found.target_form
        raise ConversionError(
            f"{unseen[0].source.path} -> {unseen[0].target.path}: the {side} side's layer settings (padding, strides, momentum) "
            "cannot be seen: pass example= so both models' outputs are compared (a Linen source as a bound module, "
            "module.bind(variables), shows its settings then too; a torch state_dict with its nn.Module, or with "
            "expected=, its outputs on the example), or settings='trust' if you know they agree")


def _refuse_dropped_optimiser(source: Any, like: Any) -> None:
    if _trains(like) and not _trains(source):
        raise ConversionError("like is a train state but the source holds no optimiser state: pass the model alone as like")
    if _trains(source) and not _trains(like):
        raise ConversionError("the source holds an optimiser state that like has no place for: pass a train state as like "
                              "(for Equinox, (model, opt_state)), or the source's model alone")


def _flatten_candidates(pair: Pair, channels: int) -> list[tuple[int, int, int] | None]:
    """The row orders to try: as they are (the channels-first side transposed before flattening), then C, H, W."""
    return [None] + _candidates(dict(pair.source.shapes)["kernel"][0], channels)


def _trains(obj: Any) -> bool:
    return containers.container_of(obj).trains


def _with_kinds(obj: Any, kinds: Mapping[str, str]) -> Any:
    """A torch side with the kinds its match told (a 4-D weight is a ConvTranspose where the other side's is)."""
    if not kinds or checks.form_of(obj) != "torch":
        return obj
    if isinstance(obj, tuple):
        sd = pytorch.state_dict_of(obj[0])
        return _told(sd, kinds), obj[1]
    return _told(pytorch.state_dict_of(obj), kinds)


def _told(sd: Any, kinds: Mapping[str, str]) -> Any:
    return pytorch.StateDict(sd, {**sd.kinds, **kinds}, sd.module, sd.tensors, sd.ordered)


def _told_kinds(found: Plan) -> tuple[dict[str, str], dict[str, str]]:
    """For each side, the layers whose kind only the other side tells."""
    source, target = {}, {}
    for p in found.pairs:
        if "|" in p.source.kind and "|" not in p.target.kind:
            source[p.source.path] = p.target.kind
        if "|" in p.target.kind and "|" not in p.source.kind:
            target[p.target.path] = p.source.kind
    return source, target


def _move(source: Any, like: Any, found: Plan, flattens: Mapping[str, tuple[tuple | None, bool]]) -> Any:
    source_kinds, target_kinds = _told_kinds(found)
    source, like = _with_kinds(source, source_kinds), _with_kinds(like, target_kinds)
    source_options, target_options = _options(found, flattens)
    _, tree = containers.split(source, source_options)
    return containers.container_of(like).rebuild(like, tree, target_options)


def running(side: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, an error from running a model on the example told as a ConversionError that says what to pass."""
    try:
        return fn()
    except ConversionError:
        raise
    except Exception as err:  # the user's model, batch or call: any error a library raises
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConversionError(
            f"example=: running the {side} on it failed ({type(err).__name__}: {first}); where a plain call does not fit "
            "(train=False, a state, another layout), pass call=(source_fn, like_fn), each fn(model, batch)"
        ) from err


def _verify(found: Plan, source: Any, moved: Any, example: Any, call: Calls | None, firsts: tuple[bool, bool],
            tolerance: float, expected: Any = None) -> float:
    a, b = checks.runnable(source), checks.runnable(moved)
    if (a is None and expected is None) or b is None:
        side = "source" if b is not None else "target"
        raise ConversionError(f"example=: the {side} is plain arrays and cannot be run: pass a module (Linen: "
                              "module.bind(variables); torch: the nn.Module)" + (", or expected=, the source's outputs on the "
                                                                                "example" if side == "source" else ""))
    given = call or (None, None)  # a side without its own call runs the default way, in inference mode
    a = checks.inference(a) if a is not None and given[0] is None else a
    b = checks.inference(b) if given[1] is None else b
    calls = tuple(fn or checks.default_call for fn in given)
    y_source = (expected, {}) if expected is not None else running("source", lambda: trace.outputs(a, calls[0], example))
    y_target = running("target", lambda: trace.outputs(b, calls[1], checks.move_channels(example, firsts[0], firsts[1])))
    return checks.compare_outputs(found, y_source, y_target, firsts, tolerance)


def transfer(source: Any, like: Any, *, source_names: Mapping[str, str] | None = None, names: Mapping[str, str] | None = None,
             source_flatten: Mapping[str, Any] | None = None, flatten: Mapping[str, Any] | None = None) -> Any:
    """``source`` in ``like``'s form through the functional paths each side's ``names`` give (no matching).

    ``source_names``/``source_flatten`` are for the source's form, ``names``/``flatten`` for ``like``'s;
    the layers' settings are checked (:func:`checks.check_layers`).
    """
    checks.check_layers(source, like, source_names=source_names, names=names)
    if containers.holds_state(like):
        params, model_state = variables_to_functional(source, names=source_names, flatten=source_flatten)
        return variables_from_functional(params, model_state, like, names=names, flatten=flatten)
    return from_functional(to_functional(source, names=source_names, flatten=source_flatten), like, names=names, flatten=flatten)

