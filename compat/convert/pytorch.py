"""PyTorch as a form: a ``state_dict`` (torch's dotted keys), a ``.safetensors`` file, an ``nn.Module``.

torch is imported only where it is installed and an object of it is handed over; a state_dict of
numpy arrays converts without it. Inside the converter a state_dict is a :class:`StateDict`, a
pytree whose keys keep torch's order, and its layers are read from its keys: each key's last part
is the array (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), the
rest the layer. Where only arrays are known, a 4-D ``weight`` may be a Conv or a ConvTranspose and a
bias-less 2-D one a Linear or an Embedding; a module tells, and so does the layer it is matched with.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pureflax.compat.convert import layouts, settings as s
from pureflax.compat.convert.trees import ConversionError, Path

STATISTICS = {"running_mean": "mean", "running_var": "var"}
COUNTER = "num_batches_tracked"
_CLASS_KINDS = {"Linear": "Dense", "Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "ConvTranspose1d": "ConvTranspose",
                "ConvTranspose2d": "ConvTranspose", "ConvTranspose3d": "ConvTranspose", "BatchNorm1d": "BatchNorm",
                "BatchNorm2d": "BatchNorm", "BatchNorm3d": "BatchNorm", "LayerNorm": "LayerNorm", "GroupNorm": "GroupNorm",
                "Embedding": "Embed"}


@jax.tree_util.register_pytree_with_keys_class
class StateDict(dict):
    """A torch state_dict inside the converter: arrays by dotted key, in torch's order, and what is known of its layers."""

    def __init__(self, arrays: Mapping[str, Any], kinds: Mapping[str, str] | None = None, module: Any = None,
                 tensors: bool = False, ordered: bool | None = None):
        super().__init__(arrays)
        # torch's own order (a module's, torch.save's) or perhaps sorted (safetensors sorts; so may a dict's maker)
        self.ordered = (module is not None or list(arrays) != sorted(arrays)) if ordered is None else ordered
        self.kinds = dict(kinds or {})  # layer path -> kind, where a module or a match tells
        self.module = module  # the nn.Module it came from, if any (its settings)
        self.tensors = tensors  # it came as torch tensors: it goes back as them

    def tree_flatten_with_keys(self):
        aux = (tuple(self), self.kinds, self.module, self.tensors, self.ordered)
        return [(jax.tree_util.DictKey(k), v) for k, v in self.items()], aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, kinds, module, tensors, ordered = aux
        return cls(dict(zip(keys, children)), kinds, module, tensors, ordered)

    def replace(self, arrays: Mapping[str, Any]) -> StateDict:
        return StateDict(arrays, self.kinds, self.module, self.tensors, self.ordered)


def torch_module():
    """torch, where it is installed and already imported by the caller (pureflax never imports it first)."""
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def is_module(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.nn.Module)


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, jax.ShapeDtypeStruct)) or is_tensor(x)


def is_state_dict(x: Any) -> bool:
    """torch's flat mapping of dotted keys to arrays (numpy, JAX or torch)."""
    if isinstance(x, StateDict):
        return True
    return (isinstance(x, Mapping) and bool(x) and type(x).__name__ != "State" and all(isinstance(k, str) for k in x)
            and all(_is_array(v) for v in x.values()) and any("." in k for k in x))


def _array(v: Any) -> Any:
    """numpy for torch's tensors; numpy and JAX arrays as they are (an int64 counter stays int64)."""
    return v.detach().cpu().numpy() if is_tensor(v) else v


def state_dict_of(obj: Any) -> StateDict:
    """A :class:`StateDict` of a mapping or an ``nn.Module`` (its ``state_dict()``, its settings kept)."""
    if isinstance(obj, StateDict):
        return obj
    if is_module(obj):
        found = state_dict_of(obj.state_dict())
        kinds = {path.replace(".", "/"): _CLASS_KINDS[type(m).__name__] for path, m in obj.named_modules()
                 if type(m).__name__ in _CLASS_KINDS}
        return StateDict(found, kinds, obj, tensors=True)
    return StateDict({k: _array(v) for k, v in obj.items()}, tensors=any(is_tensor(v) for v in obj.values()))


def back(sd: StateDict) -> Any:
    """A filled :class:`StateDict` as the user gave its like: torch tensors, numpy arrays, or the module loaded."""
    if sd.tensors or sd.module is not None:
        torch = torch_module()
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
        if sd.module is not None:
            import copy

            module = copy.deepcopy(sd.module)
            module.load_state_dict(tensors, strict=True)
            return module
        return tensors
    return {k: v if isinstance(v, jax.ShapeDtypeStruct) else np.asarray(v) for k, v in sd.items()}


def layer_arrays(sd: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layers of a state_dict in its order: '/'-joined layer path -> {array name: array}."""
    layers: dict[str, dict[str, Any]] = {}
    for key, value in sd.items():
        layer, _, name = key.rpartition(".")
        layers.setdefault(layer.replace(".", "/"), {})[name] = value
    return layers


def kind_of(path: str, arrays: Mapping[str, Any], kinds: Mapping[str, str]) -> str:
    if path in kinds:
        return kinds[path]
    if "running_mean" in arrays:
        return "BatchNorm"
    ndim = len(np.shape(arrays["weight"])) if "weight" in arrays else 0
    if ndim == 2:
        return "Dense" if "bias" in arrays else "Dense|Embed"
    if ndim >= 3:
        return "Conv|ConvTranspose"
    return "LayerNorm|GroupNorm"


_DEFAULT_OF = {"Dense|Embed": "Dense", "Conv|ConvTranspose": "Conv", "LayerNorm|GroupNorm": "LayerNorm"}


def row_of(kind: str) -> layouts.Layout:
    kind = _DEFAULT_OF.get(kind, kind)
    return next(row for row in layouts.LAYOUTS if row.form == "torch" and row.kind == kind)


def default_path(path: str) -> Path:
    return tuple(path.split("/")) if path else ()


def leaves_of(sd: StateDict) -> tuple[dict, dict[str, Path]]:
    """The params of a state_dict as leaf-table entries (keystr -> Leaf), and its layers' default paths."""
    from pureflax.compat.convert.leaves import Leaf

    found, layers = {}, {"": ()}
    for path, arrays in layer_arrays(sd).items():
        row = row_of(kind_of(path, arrays, sd.kinds))
        layers[path] = default_path(path)
        for attr, name, rule in row.params:
            if attr in arrays:
                key = f"{path.replace('/', '.')}.{attr}" if path else attr
                found[jax.tree_util.keystr((jax.tree_util.DictKey(key),))] = Leaf(f"{path}/{attr}".lstrip("/"),
                                                                                   default_path(path) + (name,), rule, key)
    return found, layers


def stats_leaves(sd: StateDict) -> tuple[dict, dict[str, Path]]:
    """The running statistics of a state_dict as leaf-table entries (its ``num_batches_tracked`` stays where it is)."""
    from pureflax.compat.convert.leaves import Leaf

    found, layers = {}, {"": ()}
    for path, arrays in layer_arrays(sd).items():
        layers[path] = default_path(path)
        for attr, name in STATISTICS.items():
            if attr in arrays:
                key = f"{path.replace('/', '.')}.{attr}" if path else attr
                found[jax.tree_util.keystr((jax.tree_util.DictKey(key),))] = Leaf(f"{path}/{attr}".lstrip("/"),
                                                                                   default_path(path) + (name,), layouts.SAME, key)
    return found, layers


def param_keys(sd: Mapping[str, Any]) -> list[str]:
    """The keys of ``model.parameters()``, in order: the state_dict's without its buffers (torch's optimiser indexes them)."""
    return [k for k in sd if k.rpartition(".")[2] not in (*STATISTICS, COUNTER)]


# ------------------------------------------------------------------ settings


def _torch_pads(m: Any, n: int) -> Any:
    if isinstance(m.padding, str):
        return s.conv_pads(m.padding.upper(), s.ints(m.kernel_size, n), s.ints(m.stride, n), s.ints(m.dilation, n))
    return tuple((int(p), int(p)) for p in s.ints(m.padding, n))


def settings_of(m: Any) -> dict[str, Any] | None:
    """A torch layer's settings in Flax's terms (torch's BatchNorm momentum m is Flax's 1 - m)."""
    name = type(m).__name__
    kind = _CLASS_KINDS.get(name)
    if kind in ("Conv", "ConvTranspose"):
        n = len(m.kernel_size)
        out = {"strides": tuple(m.stride), "kernel_dilation": tuple(m.dilation), "feature_group_count": m.groups}
        if m.padding_mode != "zeros":
            return out | {"padding": f"{m.padding_mode} {m.padding}"}
        if kind == "Conv":
            return out | {"input_dilation": (1,) * n, "padding": _torch_pads(m, n)}
        pads = tuple((d * (k - 1) - p, d * (k - 1) - p + o)  # what conv_transpose gives lax for torch's padding
                     for k, d, p, o in zip(m.kernel_size, m.dilation, m.padding, m.output_padding))
        return out | {"transpose_kernel": False, "padding": pads}
    if kind == "BatchNorm":
        return {"epsilon": m.eps, "momentum": "cumulative average" if m.momentum is None else 1 - m.momentum}
    if kind == "LayerNorm":
        return {"epsilon": m.eps, "axes": ((-1,), (-1,)) if len(m.normalized_shape) == 1 else f"{m.normalized_shape}"}
    if kind == "GroupNorm":
        return {"epsilon": m.eps, "num_groups": m.num_groups}
    return {} if kind else None


def load_file(path: str) -> StateDict:
    """A ``.safetensors`` file (torch's flat keys), or with torch installed a ``.pt``/``.pth`` one, never a plain unpickle."""
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import load_file as load

        return StateDict(state_dict_of(load(str(path))), ordered=False)  # its keys come back sorted
    if importlib.util.find_spec("torch") is None:
        raise ConversionError(f"{path}: a torch file loads only with torch installed (pip install torch), through "
                              "torch.load(weights_only=True); or save it as .safetensors")
    import torch

    found = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(found, Mapping):
        raise ConversionError(f"{path}: holds a {type(found).__name__}, not a state_dict")
    return state_dict_of(found)
