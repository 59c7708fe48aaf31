"""Tiny MNIST-shaped data and in-process access to the scripts, shared by the tests."""

import importlib.util
from pathlib import Path

import numpy as np

from pureflax.data import MNIST, Split

ROOT = Path(__file__).resolve().parents[1]


def tiny_mnist(n_train=96, n_test=30, seed=0):
    """Random uint8 images with one class-dependent bright pixel: something to learn."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 40, (n, 784)).astype(np.uint8)
        images[np.arange(n), labels * 70 + 50] = 255
        return Split(images, labels)

    return MNIST(split(n_train), split(n_test))


def load_script(name):
    """``scripts/<name>.py`` as a module, so its ``main`` runs in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Crash(BaseException):
    """What a kill looks like from inside a run (raised by its hook): nothing below catches it, nothing is saved."""


def flags(base, extra):
    """A script's flags: ``base`` (flag -> value) with a flag in ``extra`` replacing its value there, then ``extra``."""
    extra = list(map(str, extra))
    return [*(str(x) for flag, value in base.items() if flag not in extra for x in (flag, value)), *extra]


def saved_mnist(tmp_path_factory, n_train, n_test=16):
    """:func:`tiny_mnist` saved as ``train.py --data`` reads it, in a folder of the test session."""
    from pureflax.data import save_mnist

    path = tmp_path_factory.mktemp("data") / "mnist"
    save_mnist(tiny_mnist(n_train=n_train, n_test=n_test), path)
    return path
