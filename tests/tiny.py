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
