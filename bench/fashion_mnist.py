"""Fashion-MNIST from its IDX files, for the benchmarks that need real 28x28 images.

The data are not shipped with ghess. Get the four ``*-ubyte.gz`` files from
https://github.com/zalandoresearch/fashion-mnist (MIT licence), or on Debian and
Ubuntu ``apt install dataset-fashion-mnist``, which puts them in
:data:`DEFAULT_ROOT`; ``GHESS_FASHION_MNIST`` or a ``root`` argument points elsewhere.
"""

import gzip
import os

import numpy as np

#: where Debian's ``dataset-fashion-mnist`` package installs the files
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def default_root():
    """``GHESS_FASHION_MNIST`` if set, else Debian's location."""
    return os.environ.get("GHESS_FASHION_MNIST") or DEFAULT_ROOT


def read_idx(path):
    """Return the unsigned-byte array of one gzipped IDX file (LeCun's MNIST format).

    The header is two zero bytes, the type code (0x08: unsigned bytes, the only
    one these datasets use), the number of dimensions, then each dimension as a
    big-endian 32-bit integer.
    """
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file: header "
                         f"{data[:4].hex() or 'empty'}, expected 0000 08 then the rank")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: the header gives shape {shape}, {int(np.prod(shape))} "
                         f"bytes, but {len(data) - header} bytes follow it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load(split="train", n_samples=None, root=None):
    """Return ``(X, y)``: the first ``n_samples`` images of ``split`` (``"train"`` or
    ``"test"``), flattened (784 pixels) and scaled to [0, 1] (float64), and their
    labels 0-9 (int64).

    Raises FileNotFoundError, naming the missing files and how to get them.
    """  # noqa: D205
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    root = default_root() if root is None else root
    images_name, labels_name = FILES[split]
    paths = [os.path.join(root, name) for name in (images_name, labels_name)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)}; install Debian's "
            "dataset-fashion-mnist package, or download the files from "
            "https://github.com/zalandoresearch/fashion-mnist and set GHESS_FASHION_MNIST "
            "to their directory")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST in {root}: images {images.shape} and labels "
                         f"{labels.shape} do not pair up")
    if n_samples is not None and not 1 <= n_samples <= len(labels):
        raise ValueError(f"n_samples must lie in [1, {len(labels)}] for Fashion-MNIST's "
                         f"{split} split, got {n_samples}")
    images, labels = images[:n_samples], labels[:n_samples]
    return (images.reshape(len(images), -1) / 255.0, labels.astype(np.int64))
