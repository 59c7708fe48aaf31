"""torch.optim's state (AdamW, Adam, SGD with momentum) as optax's, and back.

torch keys its optimiser's ``state`` by the index of each parameter in ``model.parameters()``:
the state_dict's keys without its buffers, in order. Its moments are laid out as their parameters
are, so they move by the same rules: ``exp_avg`` <-> ``mu``, ``exp_avg_sq`` <-> ``nu``, ``step`` <->
``count``, ``momentum_buffer`` <-> ``trace``. Hyperparameters are compared with the target's where
optax shows them (``optax.inject_hyperparams``); a difference is refused naming both values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pureflax.compat.convert.pytorch import StateDict, is_tensor, param_keys, torch_module
from pureflax.compat.convert.trees import ConversionError

_MOMENTS = {"exp_avg": ("ScaleByAdamState", "mu"), "exp_avg_sq": ("ScaleByAdamState", "nu"),
            "momentum_buffer": ("TraceState", "trace")}
# torch's param_groups entry -> optax's hyperparameter (inject_hyperparams), how to read it
_HYPER = {"learning_rate": lambda g: g["lr"], "b1": lambda g: g["betas"][0], "b2": lambda g: g["betas"][1],
          "eps": lambda g: g["eps"], "weight_decay": lambda g: g["weight_decay"], "momentum": lambda g: g["momentum"]}
_INJECTED = tuple(getattr(optax, n) for n in ("InjectHyperparamsState", "InjectStatefulHyperparamsState") if hasattr(optax, n))


class TorchOptimizer(NamedTuple):
    """torch's optimiser state inside the converter: its moments as state_dicts of the parameters."""

    step: Any  # int: the steps it took
    moments: dict[str, Any]  # 'exp_avg' / 'exp_avg_sq' / 'momentum_buffer' -> StateDict (or, converted, functional params)
    groups: tuple  # its param_groups, as they came


def is_optimizer_state(x: Any) -> bool:
    return isinstance(x, Mapping) and {"state", "param_groups"} <= set(x)


def _np(v: Any) -> Any:
    return jnp.asarray(v.detach().cpu().numpy()) if is_tensor(v) else jnp.asarray(v)


def from_torch(opt: Mapping, sd: StateDict) -> TorchOptimizer:
    keys = param_keys(sd)
    if len(opt["param_groups"]) != 1:
        raise ConversionError(f"the torch optimiser has {len(opt['param_groups'])} param_groups: one converts (optax's "
                              "per-parameter settings are optax.multi_transform)")
    indices = list(opt["param_groups"][0]["params"])
    if len(indices) != len(keys):
        raise ConversionError(f"the torch optimiser holds {len(indices)} parameters, the state_dict {len(keys)} "
                              f"({keys[:4]}...): was it made for this model's parameters()?")
    state = opt["state"]
    for k, i in zip(keys, indices):
        for name, value in state.get(i, {}).items():
            if name in _MOMENTS and tuple(np.shape(value)) != tuple(np.shape(sd[k])):
                raise ConversionError(
                    f"the torch optimiser's parameter {i} has {name} of shape {tuple(np.shape(value))}, but the state_dict's "
                    f"parameter {i} ({k}) has shape {tuple(np.shape(sd[k]))}: its keys are not in model.parameters() order "
                    "(a .safetensors file sorts them): pass model.state_dict() itself, in torch's order")
    names = sorted({name for entry in state.values() for name in entry if name in _MOMENTS})
    moments = {}
    for name in names:
        moments[name] = StateDict({k: _np(state[i][name]) if i in state else jnp.zeros_like(sd[k])
                                   for k, i in zip(keys, indices)}, sd.kinds, ordered=sd.ordered)
    steps = {int(_np(entry["step"])) for entry in state.values() if "step" in entry}
    if len(steps) > 1:
        raise ConversionError(f"the torch optimiser's parameters took different numbers of steps ({sorted(steps)}): optax counts one")
    return TorchOptimizer(steps.pop() if steps else 0, moments, tuple(opt["param_groups"]))


def _compare(hyper: Mapping[str, Any], group: Mapping[str, Any]) -> None:
    for name, read in _HYPER.items():
        if name not in hyper or isinstance(hyper[name], (jax.ShapeDtypeStruct, jax.core.Tracer)):
            continue  # not shown, or only its shape (a like made from shapes)
        try:
            theirs = float(read(group))
        except (KeyError, TypeError):
            continue
        ours = float(np.asarray(hyper[name]))
        if not np.isclose(ours, theirs, rtol=1e-6, atol=0):
            raise ConversionError(f"optimiser: {name} is {theirs:.6g} in torch's param_groups and {ours:.6g} in optax's state: "
                                  "they would take different steps; build the optax optimiser with the same value (torch "
                                  "AdamW's default weight_decay is 0.01, optax's 1e-4)")


def as_optax(opt: TorchOptimizer, like: Any, is_params: Callable[[Any], bool]) -> Any:
    """``like``'s optax state (its structure) holding torch's step and moments (already functional)."""
    used: set[str] = set()

    def node(x: Any) -> Any:
        kind = type(x).__name__
        if isinstance(x, _INJECTED):
            _compare(x.hyperparams, opt.groups[0])
            inner = as_optax(opt, x.inner_state, is_params)
            used.update(opt.moments)
            return x._replace(count=jnp.asarray(opt.step, np.dtype(x.count.dtype)), inner_state=inner)
        if kind in ("ScaleByAdamState", "TraceState"):
            fields = {}
            for moment, (state, field) in _MOMENTS.items():
                if state == kind:
                    if moment not in opt.moments:
                        raise ConversionError(f"optimiser: the target's optax state has {kind}.{field}, but torch's state has "
                                              f"no {moment} (its moments: {sorted(opt.moments) or 'none'}): another optimiser?")
                    fields[field] = opt.moments[moment]
                    used.add(moment)
            if "count" in x._fields:  # (a tuple's .count is a method)
                fields["count"] = jnp.asarray(opt.step, np.dtype(x.count.dtype))
            return x._replace(**fields)
        if is_params(x):
            raise ConversionError(f"optimiser: the target's optax state keeps a {kind} shaped like the params, which torch's "
                                  "optimiser has no counterpart for")
        return x

    out = jax.tree_util.tree_map(node, like, is_leaf=lambda x: isinstance(x, _INJECTED) or type(x).__name__ in
                                 ("ScaleByAdamState", "TraceState") or is_params(x))
    if set(opt.moments) - used:
        raise ConversionError(f"optimiser: torch's state has {sorted(set(opt.moments) - used)}, which the target's optax "
                              "state has no place for: another optimiser?")
    return out


def optax_moments(opt_state: Any) -> tuple[Any, dict[str, Any], Any]:
    """An optax state's step, moments by torch's names (functional trees) and hyperparameters (None: not shown)."""
    step, moments, hyper = None, {}, None
    for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, _INJECTED) or type(x).__name__ in
                                       ("ScaleByAdamState", "TraceState")):
        if isinstance(x, _INJECTED):
            hyper = x.hyperparams
            inner_step, moments, _ = optax_moments(x.inner_state)
            step = x.count if inner_step is None else inner_step
        elif type(x).__name__ in ("ScaleByAdamState", "TraceState"):
            for moment, (state, field) in _MOMENTS.items():
                if state == type(x).__name__:
                    moments[moment] = getattr(x, field)
            if "count" in x._fields:  # (a tuple's .count is a method)
                step = x.count
    return step, moments, hyper


def to_torch(opt_state: Any, like: Mapping, fill: Callable[[Any], StateDict], step: Any) -> dict:
    """torch's optimiser state_dict from a functional optax state: ``fill`` lays a moment out as the state_dict."""
    found_step, moments, hyper = optax_moments(opt_state)
    if not moments:
        raise ConversionError("optimiser: the optax state holds no moments torch's AdamW, Adam or SGD(momentum) keep")
    group = dict(like["param_groups"][0])
    if hyper is not None:
        _compare(hyper, group)
    filled = {name: fill(tree) for name, tree in moments.items()}
    keys = param_keys(next(iter(filled.values())))
    count = int(np.asarray(found_step if found_step is not None else step))
    tensors = any(is_tensor(v) for entry in like["state"].values() for v in entry.values()) or torch_module() is not None
    as_array = (lambda v: torch_module().from_numpy(np.array(v))) if tensors else np.asarray
    state = {}
    for i, key in zip(group["params"], keys):
        entry = {"step": as_array(np.asarray(count, np.float32))} if "exp_avg" in filled else {}
        entry |= {name: as_array(sd[key]) for name, sd in filled.items()}
        state[i] = entry
    return {"state": state, "param_groups": [group]}
