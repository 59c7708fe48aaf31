"""Watching a model run: the order its layers are called in, and each layer's output.

Linen offers ``nn.intercept_methods``; for NNX and Equinox the ``__call__`` of each layer class
the model holds is wrapped for the length of one call (and restored after it), and a layer is
known by the identity of its module. Outputs leave the trace through ``jax.debug.callback``, so
they are seen under ``jax.vmap`` too (once per example, in order), as Equinox is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from pureflax.compat.convert import layouts, leaves, pytorch
from pureflax.compat.convert.layers import nnx_modules


def _first(out: Any) -> Any:
    """A stateful layer returns ``(y, state)``: its output is ``y``."""
    return out[0] if isinstance(out, tuple) else out


def _watch(path: str, out: Any, order: list[str], values: dict[str, list] | None) -> None:
    if path in order:
        return  # a layer called again (shared): its first call counts
    order.append(path)
    if values is not None:
        values[path] = []
        jax.debug.callback(lambda v, into=values[path]: into.append(np.asarray(v)), _first(out))


@contextlib.contextmanager
def _linen(order: list[str], values: dict | None) -> Iterator[None]:
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and layouts.layout_of(context.module) is not None:
            _watch("/".join(context.module.path), out, order, values)
        return out

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def _classes(paths: Mapping[int, str], classes: set[type], order: list[str], values: dict | None) -> Iterator[None]:
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}
    for cls in classes:
        def wrapped(self, *args, _original=cls.__call__, **kwargs):
            out = _original(self, *args, **kwargs)
            if id(self) in paths:
                _watch(paths[id(self)], out, order, values)
            return out

        cls.__call__ = wrapped
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


def _module_paths(model: Any) -> dict[int, tuple[str, Any]]:
    """The layers of an NNX or Equinox model by identity: (path, module)."""
    if isinstance(model, nnx.Module):
        found = (("/".join(map(str, parts)), m) for parts, m in nnx_modules(model))
    else:
        found = ((node.form, node.module) for node in leaves.eqx_nodes(model))
    return {id(m): (path, m) for path, m in found if layouts.layout_of(m) is not None}


def watched(model: Any, call: Callable[[Any, Any], Any], x: Any, values: dict | None = None) -> tuple[Any, list[str]]:
    """``call(model, x)`` with its layers watched: the output, and the layers' paths in call order.

    ``model`` is a bound Linen module, an NNX module, an Equinox module or ``(module, eqx.nn.State)``;
    with ``values`` (a dict) each layer's output is collected into it, by path.
    """
    order: list[str] = []
    if pytorch.is_module(model):
        return _torch_watched(model, call, x, order, values), order
    if isinstance(model, nn.Module):
        with _linen(order, values):
            return call(model, x), order
    module = model[0] if isinstance(model, tuple) else model
    found = _module_paths(module)
    paths = {key: path for key, (path, _) in found.items()}
    with _classes(paths, {type(m) for _, m in found.values()}, order, values):
        out = call(model, x)
    return out, order


def _torch_watched(model: Any, call: Callable, x: Any, order: list[str], values: dict | None) -> Any:
    """A torch module's layers watched through forward hooks."""
    def hook(path: str):
        def record(module, inputs, out):
            if path not in order:
                order.append(path)
                if values is not None:
                    values[path] = [out.detach().cpu().numpy()]
        return record

    handles = [m.register_forward_hook(hook(path.replace(".", "/"))) for path, m in model.named_modules()
               if pytorch.settings_of(m) is not None]
    try:
        return call(model, x)
    finally:
        for handle in handles:
            handle.remove()


def call_order(model: Any, call: Callable[[Any, Any], Any], x: Any) -> list[str]:
    """The paths of ``model``'s layers in the order ``call(model, x)`` calls them, traced abstractly (torch: run)."""
    if pytorch.is_module(model):
        import copy

        return watched(copy.deepcopy(model).eval(), call, x)[1]
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)  # a copy traced: a call may write its statistics
        box: list = []

        def run_nnx(s, x):
            out, order = watched(nnx.merge(graphdef, s), call, x)
            box.append(order)
            return out

        jax.eval_shape(run_nnx, state, x)
        return box[0]
    if isinstance(model, nn.Module):
        unbound, variables = model.unbind()
        box = []

        def run_linen(v, x):
            out, order = watched(unbound.bind(v), call, x)
            box.append(order)
            return out

        jax.eval_shape(run_linen, variables, x)
        return box[0]
    box = []
    dynamic, static = eqx.partition(model, lambda v: eqx.is_array(v) or isinstance(v, jax.ShapeDtypeStruct))  # `like` may be shapes

    def run_eqx(d, x):
        out, order = watched(eqx.combine(d, static), call, x)
        box.append(order)
        return out

    jax.eval_shape(run_eqx, dynamic, x)
    return box[0]


def outputs(model: Any, call: Callable[[Any, Any], Any], x: Any) -> tuple[Any, dict[str, Any]]:
    """The model's output on ``x`` and each layer's output by path (stacked over a vmapped batch)."""
    if isinstance(model, nnx.Module):
        model = nnx.clone(model)  # a copy: a call may update its statistics
    values: dict[str, list] = {}
    out, _ = watched(model, call, x, values)
    jax.effects_barrier()
    seen = {path: (got[0] if len(got) == 1 else np.stack(got)) for path, got in values.items() if got}
    return out, seen
