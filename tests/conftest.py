"""Shared test configuration: strict numerics, explicit keys."""

import itertools
import os
import shutil
import tempfile

# XLA's optimisation passes cost more than they save on the tests' tiny programs: compile with
# most of them off (JAX's own test suite does the same), here and in the scripts the tests run
# in subprocesses. The forms agree bit for bit at either setting (scripts/parity.py measures the
# figures of docs/parity.md with XLA's defaults, as users run).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's fusion emitters spend far longer compiling even a lone elementwise op (an eager `x + y`)
# than its older emitters. The suite compiles thousands of programs, most of them such ops, so it
# runs with the older ones, every test passing either way (docs/testing.md has the figures).
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# The libraries pureflax imports, imported before pureflax is: while a module under jaxtyping's
# import hook (--jaxtyping-packages) executes, the hook points Python's .pyc lookup at its own
# tagged files, so every library first imported from inside a pureflax module was compiled from
# source, its .pyc ignored (docs/testing.md has the figures).
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # as pureflax.viz: files only
import beartype, datasets, equinox, flax.linen, flax.nnx, flax.training.train_state, matplotlib.pyplot  # noqa: E401,E402,F401
import optax, orbax.checkpoint, pyarrow, safetensors.numpy, tqdm.auto  # noqa: E401,E402,F401

jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"))
# float32 matrix products in float32 on every platform: a GPU's default is TF32 (~1e-3 relative),
# and the parity tests compare the forms, not the accelerator's rounding (docs/performance.md, GPU).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")

# One persistent compilation cache for the whole session, shared with the scripts the tests
# run in subprocesses and with the pytest-xdist workers (they inherit this environment from
# the controller, which removes the cache at the end): XLA on CPU compiles each random-init
# kernel anew, and every fit builds its steps anew. Every program is cached, however quick to
# compile (docs/testing.md has the figures).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pureflax-jax-cache-")
_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture
def getkey():
    """Return a function that hands out a fresh, distinct key on each call."""
    counter = itertools.count()
    return lambda: jax.random.key(next(counter))


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


# The slowest files first, so pytest-xdist (--dist=loadfile, --no-loadscope-reorder) hands them
# out before the quick ones and the workers finish together: seconds of one worker each,
# measured with --durations=0 on a 2-core CPU. Files not listed keep their order, after these.
SLOWEST_FIRST = ("test_distributed.py", "test_resume.py", "test_docs.py", "test_faults.py", "test_sweep.py", "test_convvae.py", "test_parity.py",
                 "test_site.py", "test_notebook.py",
                 "test_train.py", "test_trained.py", "test_loop.py", "test_migrate.py", "test_nnx.py",
                 "test_pytorch.py", "test_backends.py", "test_vae.py", "test_convert.py", "test_layers.py",
                 "test_optim.py", "test_convert_layers.py", "test_step.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept
