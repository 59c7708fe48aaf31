"""Every pair of backends computes the same thing from the same weights (limits from the design)."""

import json

import jax
import pytest

from pureflax import vae
from pureflax.compat import parity
from pureflax.compat.backends import BACKENDS
from pureflax.data import save_mnist
from tiny import load_script, tiny_mnist

CONFIG = vae.VAEConfig()  # full size: the shapes that matter
SEED = jax.random.PRNGKey(0xFFFF)


@pytest.fixture(scope="module")
def batches():
    """The batches each measure sees (random_batch jitted: the same values, one dispatch each rather than ~10)."""
    random_batch = jax.jit(parity.random_batch, static_argnums=1)
    return {
        "forward": random_batch(jax.random.PRNGKey(1), 16),
        "grad": random_batch(jax.random.PRNGKey(2), 16),
        "trained": [random_batch(jax.random.PRNGKey(100 + i), 16) for i in range(200)],
    }


MEASURES = {  # what -> (measure, its limit)
    "forward": (parity.forward_max_abs_diff, 1e-5),
    "grad": (parity.grad_max_rel_diff, 1e-5),
    "trained": (parity.trained_params_max_abs_diff, 1e-4),
}


@pytest.fixture(scope="module")
def equal(batches):
    """``equal(what)``: that measure from the same weights in every form, computed once.

    The limit tests assert on it; the test that the measures can fail compares against it.
    """
    done = {}

    def measured(what):
        if what not in done:
            done[what] = MEASURES[what][0](CONFIG, SEED, batches[what])
        return done[what]

    return measured


def test_forward_outputs_agree_within_1e_5(equal):
    diffs = equal("forward")
    assert max(diffs.values()) <= 1e-5, diffs


def test_gradients_agree_within_1e_5_relative(equal):
    diffs = equal("grad")
    assert max(diffs.values()) <= 1e-5, diffs


def test_params_agree_within_1e_4_after_200_adamw_steps(batches, equal):
    assert len(batches["trained"]) == 200
    diffs = equal("trained")
    assert max(diffs.values()) <= 1e-4, diffs


def with_other_weights(monkeypatch, name, scale=1.01):
    """From here on, backend ``name`` starts from the shared init with ``decoder/Dense_0/kernel`` scaled by ``scale``."""
    real = BACKENDS[name]

    def factory(config):
        backend = real(config)

        def init_params(key, native):
            params = backend.init_params(key, native)
            functional = backend.to_functional(params)
            dense = functional["decoder"]["Dense_0"]
            off = {**functional, "decoder": {**functional["decoder"], "Dense_0": {**dense, "kernel": dense["kernel"] * scale}}}
            return backend.from_functional(off, params)

        return backend._replace(init_params=init_params)

    monkeypatch.setitem(BACKENDS, name, factory)


def test_the_measures_fail_when_one_form_has_other_weights(monkeypatch, batches, equal, tmp_path):
    """Each measure is within its limit for equal weights and far over it for every pair with a form that is 1% off.

    The same config and batches as the limit tests above (so the same compiled programs);
    for the trained figure two of the 200 batches carry the difference through the optimiser.
    """
    same = {what: equal(what) for what in MEASURES}  # before the weights change
    with_other_weights(monkeypatch, "equinox")
    data = {**batches, "trained": batches["trained"][:2]}
    other = {what: measure(CONFIG, SEED, data[what]) for what, (measure, _) in MEASURES.items()}
    for what, (_, limit) in MEASURES.items():
        assert set(same[what]) == set(other[what]) == set(parity.PAIRS), what
        assert max(same[what].values()) <= limit, (what, same[what])
        for pair in parity.PAIRS:
            if "equinox" in pair:
                assert other[what][pair] > 10 * limit, (what, pair, other[what])
            else:  # the untouched pairs still agree
                assert other[what][pair] <= limit, (what, pair, other[what])

    # The log measure: identical logs agree exactly; a run whose loss is 1% off is far over 1e-3.
    rows = [{"step": s, "loss": 40.0 - s / 20, "mse": 39.0 - s / 20, "kl": 0.5 + s / 100} for s in range(25, 301, 25)]
    runs = {}
    for name in parity.NAMES:
        runs[name] = tmp_path / name
        runs[name].mkdir()
        factor = 1.01 if name == "flax" else 1.0
        lines = [json.dumps({**r, "loss": r["loss"] * factor}) for r in rows] + [json.dumps({"test_loss": 1.0})]
        (runs[name] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logs = parity.log_max_rel_diff(runs)
    assert logs[("functional", "equinox")] == 0.0
    assert logs[("functional", "flax")] > 5e-3 and logs[("equinox", "flax")] > 5e-3, logs


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """train.py for each backend, same seed, 300 steps on a small dataset.

    400 images: 25 steps an epoch (12 epochs), so every log window of 25 steps is one fused
    chunk of the same length (one compiled program per backend; 480 images, 30 steps an
    epoch, gave chunks of 25 and 5: two).
    """
    root = tmp_path_factory.mktemp("parity")
    save_mnist(tiny_mnist(n_train=400, n_test=32), root / "data")
    script = load_script("train")
    runs = {}
    for name in parity.NAMES:
        runs[name] = root / name
        args = ["--backend", name, "--data", str(root / "data"), "--out", str(runs[name]),
                "--epochs", "12", "--max-steps", "300", "--seed", "7", "--log-every", "25", "--no-pictures"]
        assert script.main(args) == 0
    return runs


def test_train_py_loss_logs_agree_within_1e_3_relative(cli_runs):
    for out in cli_runs.values():  # a log line every 25 of the 300 steps
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["global_step"] for r in rows if "loss" in r] == list(range(25, 301, 25))
    diffs = parity.log_max_rel_diff(cli_runs)
    assert max(diffs.values()) <= 1e-3, diffs


def test_a_300_step_run_of_any_backend_loads_into_every_form_with_the_same_forward_pass(cli_runs):
    """``pureflax.compat.load(run, form)``: functional, Linen and NNX bit for bit, Equinox within float rounding."""
    from pureflax import step as step_lib
    from pureflax.compat import load
    from pureflax.compat.backends import get_backend

    x, c = step_lib.to_inputs(parity.random_batch(jax.random.PRNGKey(1), 16), CONFIG.num_classes)
    noise = jax.random.PRNGKey(7)
    for writer, out in cli_runs.items():
        # each form as its users call it: the NNX module itself, the others through their apply
        outputs = {form: load(out, form)(x, c, noise) if form == "nnx"
                   else get_backend(form, CONFIG).apply(load(out, form), {}, x, c, noise)[0] for form in parity.NAMES}
        want = outputs["functional"]
        for form in ("flax", "nnx"):
            for a, b in zip(outputs[form], want, strict=True):
                assert (a == b).all(), (writer, form)
        for a, b in zip(outputs["equinox"], want, strict=True):
            assert float(abs(a - b).max()) <= 1e-5, writer
