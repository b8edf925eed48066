"""Download and parse the full-scale datasets: MNIST, Fashion-MNIST and CIFAR-10.

The "full" presets train on the real datasets, which live on the internet.
This module is everything between a URL and a numpy array:

    fetch(url, dest)    download one file safely (atomic, checksummed, retried), with pooch
    read_idx(path)      parse the IDX format used by (Fashion-)MNIST
    load_mnist()        the four (Fashion-)MNIST files -> dict of arrays
    load_cifar10()      the CIFAR-10 python tarball    -> dict of arrays

Downloading is `pooch`'s job (temporary file, hash check, atomic rename); this module adds
mirrors, retries with a growing pause, and one-line errors (`DownloadError`) that say where
to put the file by hand on a machine without network (see `cache_dir`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import pickle
import shutil
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pooch
import requests

Checksum = tuple[str, str]  # (hashlib algorithm name, hex digest), e.g. ("md5", "f68b...")

# -----------------------------------------------------------------------------
# downloading


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message is one line and says where to put it."""


def cache_dir() -> Path:
    """Where datasets are stored: `$BNLIB_DATA` if set, else `~/.cache/bnlib`."""
    return Path(os.environ.get("BNLIB_DATA") or Path.home() / ".cache" / "bnlib")


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks so big files never sit in memory."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _copy_file_url(url: str, output_file: str | IO[bytes], pooch_obj=None,
                   check_only: bool = False) -> bool | None:
    """A pooch downloader for file:// URLs (local mirrors, and the offline tests)."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if check_only:
        return source.is_file()
    with open(source, "rb") as src, contextlib.ExitStack() as stack:
        out = output_file if hasattr(output_file, "write") else \
            stack.enter_context(open(output_file, "wb"))
        shutil.copyfileobj(src, out, 1 << 20)
    return None


def _downloader(url: str):
    if urllib.parse.urlparse(url).scheme == "file":
        return _copy_file_url
    # timeout: seconds without a byte before giving up (then retried)
    return pooch.HTTPDownloader(progressbar=False, timeout=60)


def _permanent(err: Exception) -> bool:
    """True for errors a retry cannot fix: HTTP 4xx (bar 429) and missing local files."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return err.response.status_code < 500 and err.response.status_code != 429
    return isinstance(err, FileNotFoundError)


def _reason(err: Exception) -> str:
    """A short, one-line reason for a failed download."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.ConnectionError):
        text = str(err)
        if "NameResolution" in text or "getaddrinfo" in text or "Name or service" in text:
            return "no network: the host name cannot be resolved"
        if "Connection refused" in text:
            return "connection refused"
        return "no network connection, or the connection dropped"
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    return " ".join(f"{type(err).__name__}: {err}".split())[:160]


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs every download and, without a known hash, a hint about hashes; we print
    one line of our own instead."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def fetch(url: str, dest: str | Path, sha256: str | None = None, *,
          checksum: Checksum | None = None, retries: int = 3) -> Path:
    """Download `url` to `dest` (with `pooch.retrieve`) and return `dest`.

    http(s):// and file:// URLs work (file:// is how the tests run offline). The
    bytes go to a temporary file next to `dest`, which is renamed only once complete
    and verified, so an interrupted download never leaves a half file under the final name.

    Verification: pass `sha256=hex`, or `checksum=(algorithm, hex)` for other
    hashlib algorithms (the datasets publish md5s). A mismatch deletes the file
    and raises ValueError. If `dest` already exists and matches (or there is
    nothing to check it against) the download is skipped.

    Network errors are retried `retries` times with a growing pause, except
    ones that cannot get better (404, missing file); then `DownloadError`.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    if sha256 is not None:
        if checksum is not None:
            raise ValueError("pass either sha256 or checksum, not both")
        checksum = ("sha256", sha256)
    dest = Path(dest)
    known_hash = f"{checksum[0]}:{checksum[1].lower()}" if checksum else None
    if dest.exists():
        if checksum is None or file_hash(dest, checksum[0]) == checksum[1].lower():
            return dest
        print(f"{dest} has the wrong {checksum[0]}, downloading it again")
        dest.unlink()
    print(f"downloading {url} -> {dest}")
    for attempt in range(1, retries + 1):
        try:
            with _quiet_pooch():
                return Path(pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent,
                                           downloader=_downloader(url)))
        except ValueError as e:  # pooch: hash mismatch (the downloaded file is deleted)
            if "hash" not in str(e):
                raise
            raise ValueError(f"{checksum[0]} mismatch for {url}: {' '.join(str(e).split())}"
                             " (file deleted)") from e
        except (OSError, requests.RequestException) as e:  # HTTP errors, resets, timeouts
            if attempt == retries or _permanent(e):
                raise DownloadError(
                    f"could not download {url} ({_reason(e)}). If this machine is offline,"
                    f" download the file elsewhere and place it at {dest}") from e
            print(f"download of {url} failed ({_reason(e)}), retry {attempt}/{retries - 1}")
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _fetch_mirrors(urls: list[str], dest: Path, checksum: Checksum | None) -> Path:
    """`fetch` from the first of `urls` that works; one-line DownloadError naming each failure."""
    errors = []
    for url in urls:
        try:
            return fetch(url, dest, checksum=checksum)
        except DownloadError as e:
            cause = e.__cause__
            errors.append(f"{url}: {_reason(cause) if cause else e}")
        except ValueError as e:
            errors.append(str(e))
    raise DownloadError(f"all mirrors failed for {dest.name} ({'; '.join(errors)})."
                        f" Offline? Place the file manually at {dest}")


# -----------------------------------------------------------------------------
# MNIST and Fashion-MNIST: four IDX files each

# IDX header: 2 zero bytes, a dtype code, the number of dims, then each dim as a big-endian uint32.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip-compressed or plain.

    Every field is validated, so a corrupt or truncated download fails here with a
    ValueError saying what is wrong, instead of a baffling reshape error later.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic number; don't trust the file name
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4].hex()!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: bad IDX header ({ndim} dims, {len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: shape {shape} needs {expected} bytes of data but the file"
                         f" has {len(data) - header} (truncated or corrupt download?)")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = {  # output key -> file name; the same names on every mirror, for both datasets
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
MNIST_SOURCES = {  # kind -> mirrors (tried in order) and the published md5 of each file
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion_mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    },
}


def load_mnist(kind: str = "mnist", root: str | Path | None = None,
               mirrors: list[str] | None = None, verify: bool = True) -> dict[str, np.ndarray]:
    """Load MNIST or Fashion-MNIST, downloading the four files into `root/kind/` once.

    Returns {"x_train": uint8 (60000, 28, 28), "y_train": int64 (60000,),
             "x_test": uint8 (10000, 28, 28), "y_test": int64 (10000,)}.
    `mirrors` are base URLs ending in "/" (default: the known public ones), tried
    in order per file. `verify=False` skips the published md5 check, for your own
    copies of the files (the tests use it for their tiny fake files).
    """
    if kind not in MNIST_SOURCES:
        raise ValueError(f"unknown kind {kind!r}, expected one of {sorted(MNIST_SOURCES)}")
    source = MNIST_SOURCES[kind]
    folder = Path(root if root is not None else cache_dir()) / kind
    out = {}
    for key, name in MNIST_FILES.items():
        checksum = ("md5", source["md5"][name]) if verify else None
        urls = [base + name for base in mirrors or source["mirrors"]]
        path = _fetch_mirrors(urls, folder / name, checksum)
        arr = read_idx(path)
        # labels as int64: the dtype cross-entropy losses index with
        out[key] = arr if key.startswith("x") else arr.astype(np.int64)
    for split in ("train", "test"):
        if len(out["x_" + split]) != len(out["y_" + split]):
            raise ValueError(f"{kind} {split}: {len(out['x_' + split])} images"
                             f" but {len(out['y_' + split])} labels")
    return out


# -----------------------------------------------------------------------------
# CIFAR-10: one tarball of pickled batches

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["cifar-10-batches-py/test_batch"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickling can run arbitrary code; allow only what a dict of numpy arrays needs."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x pickles (the real files)
               ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x pickles
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batches(tar: tarfile.TarFile, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the pickled batches `names` into x (N, 3, 32, 32) uint8 and y (N,) int64.

    Members are read in memory by their exact expected names, never extracted,
    so odd names like "../../x" in the archive cannot write anywhere.
    """
    xs, ys = [], []
    for name in names:
        try:
            member = tar.getmember(name)
        except KeyError:
            raise ValueError(f"{tar.name}: missing member {name}") from None
        if not member.isfile():  # a symlink/hardlink could point outside the batch folder
            raise ValueError(f"{tar.name}: {name} is not a regular file")
        try:
            batch = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
        except Exception as e:
            raise ValueError(f"{tar.name}: cannot unpickle {name} ({e})") from e
        if not isinstance(batch, dict):
            raise ValueError(f"{tar.name}: {name} holds a {type(batch).__name__}, expected a dict")
        data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
        labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(f"{tar.name}: {name} has data {data.shape} and {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32))  # each row is 1024 R, then 1024 G, then 1024 B
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: str | Path | None = None, url: str | None = None,
                 verify: bool = True) -> dict[str, np.ndarray]:
    """Load CIFAR-10, downloading `cifar-10-python.tar.gz` into `root/cifar10/` once.

    Returns {"x_train": uint8 (50000, 3, 32, 32), "y_train": int64 (50000,),
             "x_test": uint8 (10000, 3, 32, 32), "y_test": int64 (10000,)};
    channels-first (NCHW) as torch convolutions expect. The tarball is read in
    place, nothing is extracted. `verify=False` skips the published md5 check.
    """
    dest = Path(root if root is not None else cache_dir()) / "cifar10" / "cifar-10-python.tar.gz"
    fetch(url or CIFAR10_URL, dest, checksum=("md5", CIFAR10_MD5) if verify else None)
    try:
        with tarfile.open(dest, "r:gz") as tar:
            x_train, y_train = _read_cifar_batches(tar, CIFAR10_TRAIN)
            x_test, y_test = _read_cifar_batches(tar, CIFAR10_TEST)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{dest}: corrupt tarball ({e}); delete it to download again") from e
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
