"""PyTorch as a form, proven against real torch: fixtures written by ``tests/make_torch_fixtures.py``
(torch 2.13.0) are read here without torch; the live tests at the end run torch itself.

The models on the other side follow their upstream sources (``upstream.py``): Flax's examples/imagenet
ResNet with torch's paddings, and the NNX port in the style of Flax's PyTorch-migration guide.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pureflax.compat import ConversionError, convert, flax_models, migrate
from upstream import NNXResNet18, ResNet18, TorchPaddedResNet18

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch"
KEY = jax.random.key(0)


def relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def nhwc(x):
    return jnp.asarray(x).transpose(0, 2, 3, 1)


def linen_eval(m, x):
    return m(x, train=False)


def nnx_eval(m, x):
    m.eval()
    return m(x)


def not_run(m, x):  # the torch side is a state_dict: its outputs come as expected=
    raise AssertionError("a state_dict is not run")


@pytest.fixture(scope="module")
def resnet():
    """torchvision's resnet18 at width 8: its state_dict (keys verbatim, random statistics), an input and torch's output."""
    io = np.load(FIXTURES / "resnet18_io.npz")
    found = load_file(FIXTURES / "resnet18.safetensors")
    return {str(k): found[str(k)] for k in io["keys"]}, io["x"], io["y"]  # torch's key order (safetensors sorts)


def linen_resnet(net, x):
    return net.bind(jax.eval_shape(lambda: net.init(KEY, nhwc(x), train=False)))


def test_torchvisions_resnet18_state_dict_goes_into_linen_and_nnx_without_names(resnet):
    sd, x, y = resnet
    like = linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x)
    linen = migrate(sd, like, example=x, expected=y, call=(not_run, linen_eval))
    assert relative(linen_eval(linen, nhwc(x)), y) < 1e-4
    np.testing.assert_array_equal(linen.variables["batch_stats"]["ResNetBlock_2"]["norm_proj"]["var"], sd["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(linen.variables["params"]["ResNetBlock_2"]["conv_proj"]["kernel"],
                                  sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    module = migrate(sd, nnx.eval_shape(lambda: NNXResNet18(10, num_filters=8, padding="torch", rngs=nnx.Rngs(0))),
                     example=x, expected=y, call=(not_run, nnx_eval))
    assert relative(nnx_eval(module, nhwc(x)), y) < 1e-4


def test_back_to_a_state_dict_bit_for_bit_in_torchs_key_order(resnet):
    sd, x, y = resnet
    linen = migrate(sd, linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x), example=x, expected=y,
                    call=(not_run, linen_eval))
    # no torch here to run the target: its settings taken on trust, the example orders Linen's calls
    back = migrate(linen, sd, example=nhwc(x), call=(linen_eval, not_run), settings="trust")
    assert list(back) == list(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype, key
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)  # num_batches_tracked kept from the like


def test_a_state_dict_alone_shows_no_settings_so_it_is_not_taken_on_faith(resnet):
    sd, x, _ = resnet
    with pytest.raises(ConversionError, match="only the outputs can confirm: pass example="):
        migrate(sd, linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x))
    with pytest.raises(ConversionError, match="outputs differ"):  # Linen's 'SAME' at stride 2 pads (0, 1): torch's is (1, 1)
        migrate(sd, linen_resnet(ResNet18(num_classes=10, num_filters=8), x), example=resnet[1], expected=resnet[2],
                call=(not_run, linen_eval))


# ------------------------------------------------------------------- optimiser state


class SmallCNN(nn.Module):  # torch_models.SmallCNN in Linen: it flattens (H, W, C) where torch flattens (C, H, W)
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def torch_optimizer(name):
    """The fixture's torch model and optimiser state after two steps, the third batch and what torch did with it."""
    arrays = load_file(FIXTURES / f"{name}.safetensors")
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    part = lambda prefix: {k: arrays[prefix + k] for k in meta["keys"] if prefix + k in arrays}  # noqa: E731  torch's order
    state = {}
    for key, value in sorted(arrays.items()):
        if key.startswith("state."):
            index, field = key.split(".")[1:]
            state.setdefault(int(index), {})[field] = value
    return part("params."), {"state": state, "param_groups": meta["param_groups"]}, arrays["x"], arrays["y"], part("after.")


def third_step(state, x):
    """One optax step on the loss torch took its third step on: mean(model(x)²), BatchNorm on the batch."""
    def loss(params):
        out, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(out**2)

    return state.apply_gradients(grads=jax.grad(loss)(state.params))


OPTIMIZERS = {
    "adamw": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
    "sgd": optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torch_optimiser_state_continues_in_optax_as_torch_would(name):
    params, opt, x, y, after = torch_optimizer(name)
    tx = OPTIMIZERS[name]
    variables = SmallCNN().init(KEY, nhwc(x), train=False)  # concrete: optax.inject_hyperparams inits on arrays
    like = flax_models.TrainState.create(apply_fn=SmallCNN().apply, params=variables["params"], tx=tx,
                                         batch_stats=variables["batch_stats"])
    bound_like = SmallCNN().bind(variables)
    plan = convert.plan(params, bound_like, example=x, call=(not_run, linen_eval))
    assert [p.source.path for p in plan.pairs] == ["conv", "bn", "fc"]
    flax_state = migrate((params, opt), like, example=x, expected=y, call=(not_run, linen_eval))
    assert int(flax_state.step) == (2 if name == "adamw" else 0)  # torch's SGD counts no steps
    stepped = jax.jit(third_step)(flax_state, nhwc(x))
    torch_after = migrate(after, bound_like, settings="trust", flatten={"fc": (4, 4, 4)}).variables["params"]  # torch's 3rd step
    assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(relative, stepped.params, torch_after))) < 1e-5
    # straight into NNX's (model, optimizer): its own update takes torch's third step too
    model = NNXSmallCNN(nnx.Rngs(0))
    pair = migrate((params, opt), (model, nnx.Optimizer(model, tx, wrt=nnx.Param)), example=x, expected=y, call=(not_run, nnx_eval))
    nnx_model, optimizer = pair
    nnx_model.train()
    optimizer.update(nnx_model, nnx.grad(lambda m: jnp.mean(m(nhwc(x)) ** 2))(nnx_model))
    nnx_after = migrate(after, NNXSmallCNN(nnx.Rngs(0)), settings="trust", flatten={"fc": (4, 4, 4)})
    assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(relative, nnx.state(nnx_model, nnx.Param),
                                                                nnx.state(nnx_after, nnx.Param)))) < 1e-5
    # and back to torch's state_dicts, bit for bit
    pair = migrate(flax_state, (model, nnx.Optimizer(model, tx, wrt=nnx.Param)), example=nhwc(x), call=(linen_eval, nnx_eval))
    back_params, back_opt = migrate(pair, (params, opt), settings="trust", flatten={"fc": (4, 4, 4)})
    assert list(back_params) == list(params)
    for key in params:
        np.testing.assert_array_equal(back_params[key], params[key], err_msg=key)
    for index, entry in opt["state"].items():
        for field, value in entry.items():
            np.testing.assert_array_equal(back_opt["state"][index][field], value, err_msg=f"{index}.{field}")


class NNXSmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.fc = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.fc(x.reshape((x.shape[0], -1)))


def test_hyperparameters_that_differ_are_refused_naming_both():
    params, opt, x, y, _ = torch_optimizer("adamw")
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=1e-4)  # optax's default decay
    variables = SmallCNN().init(KEY, nhwc(x), train=False)  # concrete: optax.inject_hyperparams inits on arrays
    like = flax_models.TrainState.create(apply_fn=SmallCNN().apply, params=variables["params"], tx=tx,
                                         batch_stats=variables["batch_stats"])
    with pytest.raises(ConversionError, match=r"weight_decay is 0.01 in torch's param_groups and 0.0001 in optax's"):
        migrate((params, opt), like, example=x, expected=y, call=(not_run, linen_eval))


# ---------------------------------------------------------- live: torch itself runs


@pytest.fixture(scope="module")
def torch_resnet(resnet):
    """torch's own ResNet18 (tests/torch_models.py) holding the fixture's state_dict."""
    torch = pytest.importorskip("torch")
    from torch_models import ResNet18 as TorchResNet18

    model = TorchResNet18(num_classes=10, width=8)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in resnet[0].items()}, strict=True)
    return torch, model.eval()


def test_torch_loads_the_exported_state_dict_strictly_and_computes_its_own_outputs(resnet, torch_resnet):
    torch, model = torch_resnet
    _, x, y = resnet
    linen = migrate(model, linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x), example=x, call=(None, linen_eval))
    exported = migrate(linen, model, example=nhwc(x), call=(linen_eval, None))  # torch's module as like: a new one comes back
    assert isinstance(exported, torch.nn.Module) and exported is not model
    assert list(exported.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        np.testing.assert_array_equal(exported.eval()(torch.from_numpy(x)).numpy(), y)  # the same bits in, torch's outputs out


def test_with_the_torch_module_given_linens_same_padding_is_refused_naming_it(resnet, torch_resnet):
    _, model = torch_resnet
    _, x, _ = resnet
    with pytest.raises(ConversionError, match=r"ResNetBlock_2/Conv_0: padding is \(\(1, 1\), \(1, 1\)\) in the source .* 'SAME'"):
        migrate(model, linen_resnet(ResNet18(num_classes=10, num_filters=8), x), example=x, call=(None, linen_eval))


class LinenDecoder(nn.Module):  # torch_models.Decoder in Linen, its (C, H, W) reshape kept as torch's
    @nn.compact
    def __call__(self, labels):
        h = nn.Dense(64)(nn.LayerNorm(epsilon=1e-5)(nn.Embed(10, 8)(labels)))
        h = h.reshape((-1, 4, 4, 4)).transpose(0, 2, 3, 1)
        return nn.GroupNorm(num_groups=1, epsilon=1e-5)(nn.ConvTranspose(2, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)))(h))


def test_embedding_layer_norm_conv_transpose_and_group_norm_from_torch():
    torch = pytest.importorskip("torch")
    from torch_models import Decoder

    io = np.load(FIXTURES / "decoder_io.npz")
    found = load_file(FIXTURES / "decoder.safetensors")
    model = Decoder()
    model.load_state_dict({str(k): torch.from_numpy(found[str(k)]) for k in io["keys"]}, strict=True)
    labels = io["x"]
    like = LinenDecoder().bind(LinenDecoder().init(KEY, jnp.asarray(labels)))
    linen = migrate(model.eval(), like, example=labels)
    assert relative(linen(jnp.asarray(labels)).transpose(0, 3, 1, 2), io["y"]) < 1e-5
    printed = str(convert.plan(model, like, example=labels))
    assert "spatially flipped" in printed or "permuted" in printed
    with pytest.raises(ConversionError, match=r"epsilon is 1e-05 in the source .* 1e-06 in the target"):
        migrate(model, LinenDecoderDefaultEps().bind(LinenDecoderDefaultEps().init(KEY, jnp.asarray(labels))), example=labels)


class LinenDecoderDefaultEps(nn.Module):  # Flax's LayerNorm default epsilon 1e-6 against torch's 1e-5
    @nn.compact
    def __call__(self, labels):
        h = nn.Dense(64)(nn.LayerNorm()(nn.Embed(10, 8)(labels)))
        h = h.reshape((-1, 4, 4, 4)).transpose(0, 2, 3, 1)
        return nn.GroupNorm(num_groups=1, epsilon=1e-5)(nn.ConvTranspose(2, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)))(h))


def test_a_pt_file_loads_through_torch_load_weights_only(tmp_path, resnet, torch_resnet):
    torch, model = torch_resnet
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    sd, x, y = resnet
    linen = migrate(str(tmp_path / "resnet18.pt"), linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x),
                    example=x, expected=y, call=(not_run, linen_eval))
    assert relative(linen_eval(linen, nhwc(x)), y) < 1e-4


def test_a_safetensors_files_sorted_keys_are_not_taken_for_torchs_order(resnet, tmp_path):
    from safetensors.numpy import save_file

    sd, x, y = resnet
    save_file(sd, tmp_path / "resnet18.safetensors")
    like = linen_resnet(TorchPaddedResNet18(num_classes=10, num_filters=8), x)
    with pytest.raises(ConversionError, match="only the outputs can confirm"):
        migrate(tmp_path / "resnet18.safetensors", like, settings="trust")
    linen = migrate(tmp_path / "resnet18.safetensors", like, example=x, expected=y, call=(not_run, linen_eval))  # outputs confirm
    assert relative(linen_eval(linen, nhwc(x)), y) < 1e-4
