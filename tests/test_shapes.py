"""Wrongly shaped inputs fail with an error naming the argument and the expected shape,
raised while tracing (once per compilation under ``jax.jit``), never per step."""

import os
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from pureflax import losses, nn, vae
from pureflax.compat import equinox_models

CONFIG = vae.VAEConfig(encoder_dimensions=(16, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)
BATCH = 5


def _zeros_like_shapes(tree):
    """Zeros in place of the arrays of an ``eval_shape`` result: only shapes matter here (and it is fast)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s, tree)


@pytest.fixture(scope="module")
def params():
    return _zeros_like_shapes(jax.eval_shape(lambda k: vae.init(k, CONFIG), jax.random.key(0)))


def xc(batch=BATCH, features=CONFIG.input_dim, classes=CONFIG.num_classes):
    x = jnp.full((batch, features), 0.5, jnp.float32)
    c = jax.nn.one_hot(jnp.arange(batch) % classes, classes)
    return x, c


KEY = jax.random.key(1)


# --- vae.apply / encode / decode -------------------------------------------------------


def test_apply_wrong_x_width_names_x_and_the_input_size(params):
    _, c = xc()
    with pytest.raises(ValueError) as err:
        vae.apply(params, jnp.zeros((BATCH, 19)), c, KEY)
    assert str(err.value) == (
        "vae.apply: x has shape (5, 19) but the model takes 20 features "
        "(params['encoder']['Dense_0']['kernel'] is (20, 16))"
    )


def test_apply_wrong_c_width_names_c_and_the_class_count(params):
    x, _ = xc()
    with pytest.raises(ValueError) as err:
        vae.apply(params, x, jnp.zeros((BATCH, 10)), KEY)
    assert str(err.value) == (
        "vae.apply: c has shape (5, 10) but the model takes 4 classes (params['class_proj']['kernel'] is (4, 8))"
    )


def test_apply_x_and_c_with_different_batch_sizes(params):
    x, _ = xc()
    _, c = xc(batch=BATCH + 1)
    with pytest.raises(jaxtyping.TypeCheckError) as err:
        vae.apply(params, x, c, KEY)
    msg = str(err.value)
    assert "pureflax.vae.apply" in msg
    assert "parameter 'c'" in msg
    assert "'batch classes'" in msg  # the expected shape ...
    assert "batch=5" in msg  # ... and the batch size x fixed


def test_apply_1d_x_where_2d_expected(params):
    x, c = xc()
    with pytest.raises(jaxtyping.TypeCheckError) as err:
        vae.apply(params, x[0], c, KEY)
    msg = str(err.value)
    assert "parameter 'x'" in msg and "'batch features'" in msg


def test_encode_wrong_x_width(params):
    with pytest.raises(ValueError, match=re.escape("vae.encode: x has shape (5, 21) but the model takes 20 features")):
        vae.encode(params, jnp.zeros((BATCH, 21)))


def test_decode_z_with_wrong_latent_size(params):
    _, c = xc()
    with pytest.raises(ValueError) as err:
        vae.decode(params, jnp.zeros((BATCH, 4)), c)
    assert str(err.value) == (
        "vae.decode: z has shape (5, 4) but the model takes 3 latent dimensions "
        "(params['post_latent_proj']['kernel'] is (3, 8))"
    )


def test_decode_z_and_c_must_share_the_batch(params):
    _, c = xc()
    with pytest.raises(jaxtyping.TypeCheckError) as err:
        vae.decode(params, jnp.zeros((BATCH + 2, 3)), c)
    msg = str(err.value)
    assert "parameter 'c'" in msg and "'batch classes'" in msg and "batch=7" in msg


def test_sample_needs_1d_labels(params):
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'labels'"):
        vae.sample(params, jnp.zeros((2, 3), jnp.int32), KEY)


def test_numpy_inputs_are_still_accepted(params):
    # train.write_pictures hands vae.encode a NumPy batch; the checks must not refuse it.
    x, c = xc()
    mean, _ = vae.encode(params, np.asarray(x))
    assert mean.shape == (BATCH, CONFIG.latent_dim)
    assert vae.apply(params, np.asarray(x), np.asarray(c), KEY)[0].shape == x.shape


# --- losses --------------------------------------------------------------------------


def test_vae_loss_recon_and_x_mismatch():
    z = jnp.zeros((2, 3))
    with pytest.raises(jaxtyping.TypeCheckError) as err:
        losses.vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 6)), z, z)
    msg = str(err.value)
    assert "pureflax.losses.vae_loss" in msg
    assert "parameter 'x'" in msg and "'batch features'" in msg and "features=4" in msg


# --- nn layers -----------------------------------------------------------------------


def test_dense_wrong_input_names_x_and_the_expected_size():
    layer = nn.dense(3)
    p = layer.init(jax.random.key(0), jnp.zeros((1, 4)))
    with pytest.raises(ValueError) as err:
        layer.apply(p, jnp.ones((2, 5)))
    assert str(err.value) == (
        "dense: argument x: input has shape (2, 5) but the layer expects a last dimension of 4 (its kernel is (4, 3))"
    )


def test_feed_forward_wrong_input_names_the_layer_and_x():
    ff = nn.feed_forward((4, 2))
    p = ff.init(jax.random.key(0), jnp.zeros((1, 8)))
    with pytest.raises(ValueError) as err:
        ff.apply(p, jnp.ones((2, 7)))
    assert str(err.value) == (
        "feed_forward Dense_0: argument x: input has shape (2, 7) but the layer expects a last "
        "dimension of 8 (params['Dense_0']['kernel'] is (8, 4))"
    )


def test_feed_forward_inner_mismatch_names_the_inner_layer():
    ff = nn.feed_forward((4, 2))
    p = ff.init(jax.random.key(0), jnp.zeros((1, 8)))
    p = {**p, "Dense_1": {**p["Dense_1"], "kernel": jnp.zeros((5, 2))}}
    with pytest.raises(ValueError, match=re.escape("feed_forward Dense_1: the output of Dense_0 has shape (2, 4)")):
        ff.apply(p, jnp.ones((2, 8)))


def test_sequential_wrong_input_names_the_layer():
    net = nn.sequential([nn.dense(4), jax.nn.relu, nn.dense(2)])
    p = net.init(jax.random.key(0), jnp.zeros((1, 8)))
    with pytest.raises(ValueError) as err:
        net.apply(p, jnp.ones((2, 7)))
    assert str(err.value).startswith("sequential layers_0 (fed argument x): dense: argument x: input has shape (2, 7)")
    p["layers_2"] = {**p["layers_2"], "kernel": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match=re.escape("sequential layers_2 (fed the output of layers_1)")):
        net.apply(p, jnp.ones((2, 8)))


# --- Equinox -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eqx_model():
    return _zeros_like_shapes(
        eqx.filter_eval_shape(
            lambda k: equinox_models.VAE(
                latent_dim=3, encoder_dimensions=(16, 8), decoder_dimensions=(8, 20), num_classes=4, input_dim=20, key=k
            ),
            jax.random.PRNGKey(0),
        )
    )


def test_batched_apply_wrong_x_width(eqx_model):
    _, c = xc()
    with pytest.raises(ValueError) as err:
        equinox_models.batched_apply(eqx_model, jnp.zeros((BATCH, 19)), c, jax.random.PRNGKey(1))
    assert str(err.value) == (
        "batched_apply: x has shape (5, 19) but the model takes 20 features "
        "(model.encoder.layers[0].weight is (16, 20), (out, in))"
    )


def test_batched_apply_batch_mismatch(eqx_model):
    x, _ = xc()
    _, c = xc(batch=BATCH - 1)
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'c'"):
        equinox_models.batched_apply(eqx_model, x, c, jax.random.PRNGKey(1))


def test_equinox_call_takes_one_example(eqx_model):
    x, c = xc()
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'x'"):
        eqx_model(x, c[0], jax.random.PRNGKey(1))  # a batch where one example is expected
    with pytest.raises(ValueError, match=re.escape("VAE.decode: c has shape (10,) but the model takes 4 classes")):
        eqx_model.decode(jnp.zeros(3), jnp.zeros(10))


# --- trace time, not step time -------------------------------------------------------


def test_checks_run_once_per_trace_not_per_step(params, monkeypatch):
    calls = []
    check = vae._check_sizes

    def counting(*args, **kwargs):
        calls.append(args[0])
        return check(*args, **kwargs)

    monkeypatch.setattr(vae, "_check_sizes", counting)
    step = jax.jit(vae.apply)
    x, c = xc()
    for i in range(3):  # three steps, one compilation
        jax.block_until_ready(step(params, x + i, c, jax.random.key(i)))
    assert calls == ["vae.apply"]
    x2, c2 = xc(batch=BATCH + 1)
    jax.block_until_ready(step(params, x2, c2, KEY))  # a new shape: one new trace, one new check
    assert calls == ["vae.apply", "vae.apply"]
    # ... and under jit the wrong shape is still refused, while tracing.
    with pytest.raises(ValueError, match="vae.apply: x has shape"):
        step(params, jnp.zeros((BATCH, 19)), c, KEY)
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'c'"):
        step(params, x, c2, KEY)


def test_nothing_of_the_checks_is_left_in_the_compiled_step(params):
    # A check that ran per step would need a host callback in the program.
    x, c = xc()
    jaxpr = str(jax.make_jaxpr(lambda p, x, c, k: losses.vae_loss(x, *vae.apply(p, x, c, k)))(params, x, c, KEY))
    assert "callback" not in jaxpr


def test_checks_are_on_without_the_pytest_import_hook():
    # Users do not run under --jaxtyping-packages: the decorators alone must raise.
    code = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import jax, jax.numpy as jnp, jaxtyping
        from pureflax import vae, losses
        assert not any("jaxtyping" in type(f).__module__ for f in sys.meta_path), "hook active"
        cfg = vae.VAEConfig(encoder_dimensions=(4,), decoder_dimensions=(4, 6), latent_dim=2, num_classes=3, input_dim=6)
        p = vae.init(jax.random.key(0), cfg)
        try:
            vae.apply(p, jnp.zeros((2, 6)), jnp.zeros((3, 3)), jax.random.key(1))
        except jaxtyping.TypeCheckError as e:
            assert "parameter 'c'" in str(e)
        else:
            raise SystemExit("no error for a batch mismatch")
        try:
            losses.vae_loss(jnp.zeros(6), jnp.zeros(6), jnp.zeros((1, 2)), jnp.zeros((1, 2)))
        except jaxtyping.TypeCheckError as e:
            assert "parameter 'recon'" in str(e)
        else:
            raise SystemExit("no error for a 1-D recon")
        print("ok")
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
