"""Tests for bnlib.download, fully offline: every "download" reads tiny files that
the tests write themselves, through file:// URLs or a throwaway local HTTP server."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from bnlib import download
from bnlib.download import (DownloadError, cache_dir, fetch, file_hash, load_cifar10,
                             load_mnist, read_idx)

# -----------------------------------------------------------------------------
# helpers that write fake datasets


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Encode `arr` in the IDX format (big-endian payload)."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(dtype).tobytes()


def make_mnist(folder: Path, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    """Write the four (gzipped) MNIST files with random content; return the arrays."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in download.MNIST_FILES.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


def cifar_batch(n: int, offset: int) -> bytes:
    """A pickled CIFAR batch like the real ones: numpy-1 era global names, bytes keys.
    Pixel value = 100 * channel + image index, so the channel layout can be checked."""
    data = np.stack([np.repeat(np.arange(3) * 100 + offset + i, 1024) for i in range(n)])
    labels = [(offset + i) % 10 for i in range(n)]
    raw = pickle.dumps({b"data": data.astype(np.uint8), b"labels": labels}, protocol=2)
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_cifar(path: Path, n: int = 3, extra: dict[str, bytes] | None = None,
               skip: str | None = None) -> Path:
    """Write a fake cifar-10-python.tar.gz: 5 train batches and a test batch of `n` images."""
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(download.CIFAR10_TRAIN + download.CIFAR10_TEST):
            if name != skip:
                add_member(tar, name, cifar_batch(n, offset=10 * i))
        for name, payload in (extra or {}).items():
            add_member(tar, name, payload)
    return path


def all_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -----------------------------------------------------------------------------
# cache_dir and fetch


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BNLIB_DATA", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("BNLIB_DATA")
    assert cache_dir() == Path.home() / ".cache" / "bnlib"


def test_fetch_file_url_and_sha256(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 1000)
    dest = fetch(src.as_uri(), tmp_path / "out" / "dest.bin", sha256=file_hash(src))
    assert dest.read_bytes() == src.read_bytes()
    assert all_files(tmp_path / "out") == {"dest.bin"}  # no temporary file left behind


def test_fetch_wrong_checksum_raises_and_leaves_no_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError) as e:
        fetch(src.as_uri(), tmp_path / "out" / "dest.bin", sha256="0" * 64)
    assert "0" * 64 in str(e.value) and file_hash(src) in str(e.value)  # expected and actual
    assert all_files(tmp_path / "out") == set()


def test_fetch_md5_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    fetch(src.as_uri(), tmp_path / "a", checksum=("md5", file_hash(src, "md5")))
    with pytest.raises(ValueError, match="md5 mismatch"):
        fetch(src.as_uri(), tmp_path / "b", checksum=("md5", "f" * 32))
    assert not (tmp_path / "b").exists()


def test_fetch_skips_valid_file_and_replaces_bad_one(tmp_path):
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    src.write_bytes(b"good")
    good = file_hash(src)
    dest.write_bytes(b"good")
    src.unlink()
    assert fetch(src.as_uri(), dest, good).read_bytes() == b"good"  # source gone: not downloaded
    assert fetch(src.as_uri(), dest).read_bytes() == b"good"  # no hash given: trust the file
    dest.write_bytes(b"stale")  # wrong hash -> downloaded again
    src.write_bytes(b"good")
    assert fetch(src.as_uri(), dest, good).read_bytes() == b"good"


def test_fetch_missing_source_says_url_and_dest(tmp_path):
    url = (tmp_path / "nope.bin").as_uri()
    with pytest.raises(DownloadError) as e:
        fetch(url, tmp_path / "dest.bin")
    assert url in str(e.value) and str(tmp_path / "dest.bin") in str(e.value)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, plus two misbehaving paths for the retry tests:
    /flaky/NAME answers 503 to the first `fail_first` requests, then serves NAME;
    /drop/NAME announces the full length of NAME, sends 10 bytes and closes the connection."""

    fail_first = 0
    calls: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).calls.append(self.path)
        if self.path.startswith("/flaky/"):
            if len([c for c in self.calls if c == self.path]) <= self.fail_first:
                self.send_error(503, "try again")
                return
            self.path = self.path[len("/flaky"):]
        elif self.path.startswith("/drop/"):
            body = (Path(self.directory) / self.path[len("/drop/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:10])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_dir(tmp_path):
    """Serve tmp_path/www over HTTP on localhost; yields (folder, base URL, handler class)."""
    www = tmp_path / "www"
    www.mkdir()
    handler_cls = type("Handler", (_Handler,), {"calls": [], "fail_first": 0})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler_cls, directory=str(www)))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/", handler_cls
    server.shutdown()
    server.server_close()


def test_fetch_interrupted_leaves_no_half_file(http_dir, tmp_path, monkeypatch):
    www, base, _ = http_dir
    (www / "f.bin").write_bytes(b"x" * 5000)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError, match="place it at"):
        fetch(base + "drop/f.bin", tmp_path / "out" / "f.bin", retries=2)
    assert all_files(tmp_path / "out") == set()


def test_fetch_retries_transient_errors(http_dir, tmp_path, monkeypatch):
    www, base, handler = http_dir
    (www / "f").write_bytes(b"payload")
    handler.fail_first = 2
    sleeps = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    assert fetch(base + "flaky/f", tmp_path / "f", retries=3).read_bytes() == b"payload"
    assert handler.calls == ["/flaky/f"] * 3 and sleeps == [1, 2]


def test_fetch_gives_up_after_retries_with_one_line_error(http_dir, tmp_path, monkeypatch):
    www, base, handler = http_dir
    (www / "f").write_bytes(b"payload")
    handler.fail_first = 5
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError) as e:
        fetch(base + "flaky/f", tmp_path / "f", retries=2)
    assert "HTTP 503" in str(e.value) and "\n" not in str(e.value)
    assert len(handler.calls) == 2


def test_fetch_over_http_and_404_is_not_retried(http_dir, tmp_path, monkeypatch):
    www, base, handler = http_dir
    (www / "f.bin").write_bytes(b"over http")
    assert fetch(base + "f.bin", tmp_path / "f.bin").read_bytes() == b"over http"
    monkeypatch.setattr(download.time, "sleep", lambda s: pytest.fail("a 404 must not be retried"))
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(base + "missing.bin", tmp_path / "missing.bin")


def test_fetch_over_http_checks_hash(http_dir, tmp_path):
    www, base, _ = http_dir
    (www / "f.bin").write_bytes(b"over http")
    good = file_hash(www / "f.bin", "md5")
    assert fetch(base + "f.bin", tmp_path / "a", checksum=("md5", good)).exists()
    with pytest.raises(ValueError, match="md5 mismatch"):
        fetch(base + "f.bin", tmp_path / "b", checksum=("md5", "0" * 32))
    assert all_files(tmp_path) >= {"a"} and not (tmp_path / "b").exists()


def test_no_network_is_one_line(tmp_path, monkeypatch):
    """A closed port stands in for a machine without network: no traceback text, one line."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError) as e:
        fetch(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", retries=2)
    msg = str(e.value)
    assert "\n" not in msg and "connection refused" in msg and str(tmp_path / "f.bin") in msg
    assert len(msg) < 300


# -----------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arrays = [np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
              np.array([-5, 70000], dtype=np.int32),
              np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)]
    for arr, code in zip(arrays, (0x08, 0x0C, 0x0D)):
        raw = idx_bytes(arr, code)
        path = tmp_path / f"a{code}.idx"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        out = read_idx(path)
        assert out.dtype == arr.dtype and out.dtype.isnative and out.flags.writeable
        np.testing.assert_array_equal(out, arr)


GOOD = idx_bytes(np.zeros((2, 28, 28), np.uint8))


@pytest.mark.parametrize("raw, message", [
    (GOOD[:-1], "truncated"),                   # payload one byte short
    (GOOD + b"\0", "truncated"),                # trailing garbage
    (GOOD[:10], "bad IDX header"),              # header cut inside the dims
    (b"\x01\x00" + GOOD[2:], "not an IDX"),     # bad magic
    (b"\0\0\x07\x03" + GOOD[4:], "not an IDX"), # unknown dtype code
    (b"\0\0\x08\x00", "bad IDX header"),        # zero dims
    (gzip.compress(GOOD, mtime=0)[:-12], "gzip"),  # truncated gzip stream
], ids=["short", "trailing", "cut-header", "bad-magic", "bad-dtype", "zero-dims", "cut-gzip"])
def test_read_idx_rejects_corrupt(tmp_path, raw, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


# -----------------------------------------------------------------------------
# load_mnist


def test_load_mnist_from_file_mirror(tmp_path):
    arrays = make_mnist(tmp_path / "mirror")
    mirrors = [(tmp_path / "mirror").as_uri() + "/"]
    data = load_mnist(root=tmp_path / "cache", mirrors=mirrors, verify=False)
    assert data["x_train"].shape == (5, 28, 28) and data["x_test"].shape == (3, 28, 28)
    assert data["x_train"].dtype == np.uint8 and data["y_train"].dtype == np.int64
    for key in download.MNIST_FILES:
        np.testing.assert_array_equal(data[key], arrays[key])
    assert all_files(tmp_path / "cache") == {f"mnist/{n}" for n in download.MNIST_FILES.values()}


def test_load_mnist_falls_back_to_second_mirror(tmp_path):
    make_mnist(tmp_path / "mirror")
    mirrors = [(tmp_path / "does-not-exist").as_uri() + "/", (tmp_path / "mirror").as_uri() + "/"]
    data = load_mnist("fashion_mnist", root=tmp_path / "cache", mirrors=mirrors, verify=False)
    assert data["y_test"].shape == (3,)
    assert (tmp_path / "cache" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_load_mnist_does_not_redownload(tmp_path):
    arrays = make_mnist(tmp_path / "mirror")
    mirrors = [(tmp_path / "mirror").as_uri() + "/"]
    load_mnist(root=tmp_path / "cache", mirrors=mirrors, verify=False)
    for f in (tmp_path / "mirror").iterdir():
        f.unlink()  # the source is gone: the second load must use the cached files
    data = load_mnist(root=tmp_path / "cache", mirrors=mirrors, verify=False)
    np.testing.assert_array_equal(data["x_train"], arrays["x_train"])


def test_load_mnist_checks_known_md5(tmp_path):
    make_mnist(tmp_path / "mirror")  # fake files cannot match the real MNIST md5s
    with pytest.raises(RuntimeError, match="md5 mismatch"):
        load_mnist(root=tmp_path / "cache", mirrors=[(tmp_path / "mirror").as_uri() + "/"])
    assert all_files(tmp_path / "cache") == set()


def test_load_mnist_all_mirrors_fail(tmp_path):
    with pytest.raises(RuntimeError, match="Place the file manually"):
        load_mnist(root=tmp_path / "cache", mirrors=[(tmp_path / "nothing").as_uri() + "/"])


def test_load_mnist_rejects_unknown_kind_and_mismatched_counts(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        load_mnist("kmnist", root=tmp_path)
    make_mnist(tmp_path / "mirror")
    four_labels = idx_bytes(np.zeros(4, np.uint8))
    (tmp_path / "mirror" / "train-labels-idx1-ubyte.gz").write_bytes(four_labels)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        mirrors = [(tmp_path / "mirror").as_uri() + "/"]
        load_mnist(root=tmp_path / "cache", mirrors=mirrors, verify=False)


# -----------------------------------------------------------------------------
# load_cifar10


def test_load_cifar10(tmp_path):
    tar = make_cifar(tmp_path / "cifar-10-python.tar.gz")
    data = load_cifar10(root=tmp_path / "cache", url=tar.as_uri(), verify=False)
    assert data["x_train"].shape == (15, 3, 32, 32) and data["x_test"].shape == (3, 3, 32, 32)
    assert data["x_train"].dtype == np.uint8 and data["y_train"].dtype == np.int64
    assert data["y_train"].tolist() == [(10 * b + i) % 10 for b in range(5) for i in range(3)]
    assert data["y_test"].tolist() == [0, 1, 2]
    # image 4 is batch 1, image 1: pixel value = 100 * channel + 10 + 1, across the whole plane
    for c in range(3):
        assert (data["x_train"][4, c] == 100 * c + 11).all()
    assert all_files(tmp_path / "cache") == {"cifar10/cifar-10-python.tar.gz"}  # nothing extracted


def test_load_cifar10_checks_md5(tmp_path):
    tar = make_cifar(tmp_path / "fake.tar.gz")
    with pytest.raises(ValueError, match="md5 mismatch"):
        load_cifar10(root=tmp_path / "cache", url=tar.as_uri())
    assert all_files(tmp_path / "cache") == set()


def test_load_cifar10_ignores_path_traversal_members(tmp_path):
    evil = {"../evil.txt": b"x", "/tmp/bnlib-evil.txt": b"x",
            "cifar-10-batches-py/../../evil2.txt": b"x"}
    tar = make_cifar(tmp_path / "t.tar.gz", extra=evil)
    data = load_cifar10(root=tmp_path / "a" / "b", url=tar.as_uri(), verify=False)
    assert data["x_train"].shape == (15, 3, 32, 32)
    assert all_files(tmp_path / "a") == {"b/cifar10/cifar-10-python.tar.gz"}
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil2.txt").exists()


def test_load_cifar10_rejects_symlink_member(tmp_path):
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        link = tarfile.TarInfo(download.CIFAR10_TRAIN[0])
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(link)
    with pytest.raises(ValueError, match="not a regular file"):
        load_cifar10(root=tmp_path / "cache", url=path.as_uri(), verify=False)


def test_load_cifar10_rejects_missing_member_and_code_in_pickle(tmp_path):
    tar = make_cifar(tmp_path / "t1.tar.gz", skip="cifar-10-batches-py/data_batch_3")
    with pytest.raises(ValueError, match="missing member .*data_batch_3"):
        load_cifar10(root=tmp_path / "c1", url=tar.as_uri(), verify=False)

    class Exploit:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "pwned"),)

    tar = make_cifar(tmp_path / "t2.tar.gz", skip=download.CIFAR10_TEST[0],
                     extra={download.CIFAR10_TEST[0]: pickle.dumps(Exploit())})
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(root=tmp_path / "c2", url=tar.as_uri(), verify=False)
    assert not (tmp_path / "pwned").exists()


def test_load_cifar10_corrupt_tarball(tmp_path):
    tar = make_cifar(tmp_path / "t.tar.gz")
    tar.write_bytes(tar.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt tarball"):
        load_cifar10(root=tmp_path / "cache", url=tar.as_uri(), verify=False)
