"""Data sets: each config of conf/data names one of these dataclasses; `load(seed)` returns a Dataset.

Images are float32, channels last, divided by one scale decided on the stored training images and applied
to every split: none when they do not exceed 1, 255 for integer values up to 255, else their maximum.
Labels are int32 classes 0..K-1, each present in the training split; the test labels are among them.
The validation split is held out of the training data with the job's seed; the test split is used only
for reported metrics. A Dataset carries the digest of its content and warnings for conditions that are
legitimate but notable; data that would give wrong results is a one-line DataError instead.
Real data sets are read from their standard local files and never downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, require

KERAS_CACHE = "~/.keras/datasets"
MAX_LABEL = 2**31 - 1  # labels are int32


class DataError(ConfigError):
    """A data file is missing, malformed or does not fit: one line, exit status 2."""


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    digest: str  # of x_train, y_train, x_test, y_test as loaded (before the validation split)
    warnings: list[str] = field(default_factory=list)  # legitimate but notable, e.g. a class absent from val

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass
class DataSource:
    """Common options of every data set."""

    name: str = "digits"
    val_fraction: float = 0.15
    limit: int | None = None  # keep only the first N training examples (quick looks)

    def __post_init__(self):
        require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")
        require(self.limit is None or self.limit > 0, "limit", self.limit, "null or an integer > 0")

    def arrays(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """x_train, y_train, x_test, y_test as stored."""
        raise NotImplementedError

    def load(self, seed: int) -> Dataset:
        x_train, y_train, x_test, y_test = self.arrays(seed)
        x_train, y_train = _checked(x_train, y_train, f"{self.name} training data")
        x_test, y_test = _checked(x_test, y_test, f"{self.name} test data")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(f"{self.name}: train images {x_train.shape[1:]} and test images "
                            f"{x_test.shape[1:]} differ in shape")
        # classes and scale come from all stored training data: data.limit drops examples, nothing else
        num_classes, scale = _classes(y_train, y_test, self.name), _scale(x_train)
        if self.limit:
            x_train, y_train = x_train[: self.limit], y_train[: self.limit]
        x_train, x_test = _scaled(x_train, scale), _scaled(x_test, scale)
        train, val = self._split(y_train, num_classes, seed)
        warnings = [f"{self.name}: class(es) {_few(absent)} have no example in the {split} split (size {len(y)}"
                    "): its accuracy does not cover them"
                    for split, y in (("validation", y_train[val]), ("test", y_test))
                    if (absent := _absent(num_classes, y))]
        if x_test.max() > 1.0:
            warnings.append(f"{self.name}: test images reach {x_test.max():.4g} after division by {scale:g}, "
                            "the scale that brings the training images within 1")
        return Dataset(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, num_classes,
                       digest=_digest(x_train, y_train, x_test, y_test), warnings=warnings)

    def _split(self, y: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the training and validation examples, by the seed; every class keeps a training one."""
        n = len(y)
        n_val = max(1, int(round(self.val_fraction * n)))
        limited = f" (data.limit={self.limit})" if self.limit else ""
        if n - n_val < 1:
            raise DataError(f"{self.name}: {n} training example(s){limited} leave {n - n_val} for training after "
                            f"holding out {n_val} for validation (data.val_fraction={self.val_fraction}); need "
                            "at least one of each: " + ("raise data.limit or lower data.val_fraction" if self.limit
                                                        else "lower data.val_fraction or add training examples"))
        order = np.random.default_rng(seed).permutation(n)
        val, train = order[:n_val], order[n_val:]
        lacking = _absent(num_classes, y[train])
        if lacking:
            hint = ("raise data.limit" if self.limit and _absent(num_classes, y)
                    else "lower data.val_fraction or add examples of them")
            raise DataError(f"{self.name}: class(es) {_few(lacking)} of 0..{num_classes - 1} have no example "
                            f"among the {len(train)} training examples{limited} left after holding out {n_val} "
                            f"for validation (data.val_fraction={self.val_fraction}, seed {seed}); every class "
                            f"needs one: {hint}")
        return train, val


def _checked(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Images NHWC, integer or finite float32 (not yet scaled); labels int32 in [0, 2**31)."""
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must have shape (N, H, W) or (N, H, W, C), got {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels (need the same number, > 0)")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, found {y.min()}")
    if y.max() > MAX_LABEL:  # before the cast: 2**32 would wrap to 0 and merge two classes
        raise DataError(f"{what}: labels must be < 2**31 (class numbers 0..K-1), found {y.max()}")
    if not np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{what}: images contain NaN or infinite values")
    return x, y.astype(np.int32)


def _scale(x: np.ndarray) -> float:
    """The divisor for every split, from the training images: 1 within [0, 1], 255 for 8-bit values."""
    top = float(x.max())
    if top <= 1.0:
        return 1.0
    if top <= 255.0 and (np.issubdtype(x.dtype, np.integer) or np.all(np.mod(x, 1) == 0)):
        return 255.0
    return top


def _scaled(x: np.ndarray, scale: float) -> np.ndarray:
    x = x.astype(np.float32)  # a copy: the caller's arrays are left alone
    if scale != 1.0:
        x /= np.float32(scale)
    return x


def _classes(y_train: np.ndarray, y_test: np.ndarray, dataset: str) -> int:
    """K, when the training labels are exactly the classes 0..K-1 and the test labels among them."""
    k = int(y_train.max()) + 1
    present = np.unique(y_train)
    if len(present) < k:
        missing = np.setdiff1d(np.arange(k), present)
        raise DataError(f"{dataset} training data: labels must be the classes 0..K-1 with every class present, "
                        f"but the largest label is {k - 1} and {len(missing)} of 0..{k - 1} never occur "
                        f"({_few(missing)}): remap the {len(present)} distinct labels to 0..{len(present) - 1}")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise DataError(f"{dataset} test data: class(es) {_few(unseen)} never occur in the training data "
                        f"(classes 0..{k - 1}): the model cannot predict them")
    return k


def _absent(num_classes: int, y: np.ndarray) -> list[int]:
    return np.setdiff1d(np.arange(num_classes), y).tolist()


def _few(values, shown: int = 10) -> str:
    """'3, 7', or the first nine and the last: '10, 11, 12, 13, 14, 15, 16, 17, 18, ..., 199999'."""
    values = [int(v) for v in values]
    if len(values) <= shown:
        return ", ".join(map(str, values))
    return f"{', '.join(map(str, values[: shown - 1]))}, ..., {values[-1]}"


def _digest(*arrays: np.ndarray) -> str:
    """sha256 (16 hex digits) of the arrays' dtypes, shapes and bytes: the same content, the same digest."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def _require_file(path: Path, dataset: str, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"{dataset}: file not found: {path} ({hint})")
    return path


def _load_npz(path: Path, dataset: str) -> tuple[np.ndarray, ...]:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataError(f"{dataset}: {path} lacks {', '.join(missing)} (needs {', '.join(keys)})")
            return tuple(f[k] for k in keys)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{dataset}: cannot read {path} as .npz: {type(e).__name__}: {e}") from None


@dataclass
class Digits(DataSource):
    """scikit-learn's bundled 8x8 digits: works offline on a fresh machine."""

    name: str = "digits"
    test_fraction: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")

    def arrays(self, seed):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[..., None]
        # The test split is fixed (seed 0) so that every job of every seed is scored on the same examples.
        x_train, x_test, y_train, y_test = train_test_split(
            x, digits.target, test_size=self.test_fraction, random_state=0, stratify=digits.target)
        return x_train, y_train, x_test, y_test


@dataclass
class Npz(DataSource):
    """Any .npz file with x_train, y_train, x_test, y_test (loaded without pickle)."""

    name: str = "npz"
    path: str = "???"

    def arrays(self, seed):
        path = Path(os.path.expanduser(self.path))
        return _load_npz(_require_file(path, self.name, "set data.path to an .npz with x_train, y_train, "
                                       "x_test, y_test"), self.name)


@dataclass
class KerasCache(DataSource):
    """A data set in the keras cache directory (~/.keras/datasets), as keras.datasets leaves it."""

    root: str = KERAS_CACHE

    def dir(self) -> Path:
        return Path(os.path.expanduser(self.root))


@dataclass
class Mnist(KerasCache):
    name: str = "mnist"

    def arrays(self, seed):
        path = _require_file(self.dir() / "mnist.npz", self.name,
                             "keras.datasets.mnist.load_data() leaves it there on a machine with network")
        return _load_npz(path, self.name)


def _read_idx(path: Path, offset: int, dataset: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except Exception as e:
        raise DataError(f"{dataset}: cannot read {path} as gzipped IDX: {e}") from None


@dataclass
class FashionMnist(KerasCache):
    name: str = "fashion_mnist"

    def arrays(self, seed):
        d = self.dir() / "fashion-mnist"
        hint = "keras.datasets.fashion_mnist.load_data() leaves the four IDX files there"
        out = []
        for prefix in ("train", "t10k"):
            images = _require_file(d / f"{prefix}-images-idx3-ubyte.gz", self.name, hint)
            labels = _require_file(d / f"{prefix}-labels-idx1-ubyte.gz", self.name, hint)
            y = _read_idx(labels, 8, self.name)
            x = _read_idx(images, 16, self.name)
            if x.size != len(y) * 28 * 28:
                raise DataError(f"{self.name}: {images} holds {x.size} bytes, expected {len(y)} images of 28x28")
            out += [x.reshape(len(y), 28, 28), y]
        return tuple(out)


class _NoObjects(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow plain data and numpy arrays (their b'data'), never code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name) or np._core.multiarray._reconstruct


@dataclass
class Cifar10(KerasCache):
    name: str = "cifar10"

    def arrays(self, seed):
        candidates = [self.dir() / "cifar-10-batches-py-target" / "cifar-10-batches-py",
                      self.dir() / "cifar-10-batches-py"]
        d = next((c for c in candidates if c.is_dir()), candidates[0])
        hint = "keras.datasets.cifar10.load_data() extracts data_batch_1..5 and test_batch there"
        batches = [self._batch(_require_file(d / f"data_batch_{i}", self.name, hint)) for i in range(1, 6)]
        x_test, y_test = self._batch(_require_file(d / "test_batch", self.name, hint))
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
                x_test, y_test)

    def _batch(self, path: Path):
        try:
            with open(path, "rb") as f:
                batch = _NoObjects(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], np.uint8)
            return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[b"labels"])
        except Exception as e:
            raise DataError(f"{self.name}: cannot read {path} as a CIFAR-10 python batch: {e}") from None


@dataclass
class Svhn(DataSource):
    """SVHN's cropped digits from train_32x32.mat and test_32x32.mat (label 10 means digit 0)."""

    name: str = "svhn"
    root: str = "~/.keras/datasets/svhn"

    def arrays(self, seed):
        from scipy.io import loadmat

        out = []
        for split in ("train", "test"):
            path = _require_file(Path(os.path.expanduser(self.root)) / f"{split}_32x32.mat", self.name,
                                 f"download {split}_32x32.mat from the SVHN site into data.root")
            try:
                mat = loadmat(path)
                x, y = np.transpose(mat["X"], (3, 0, 1, 2)), mat["y"].reshape(-1) % 10
            except Exception as e:
                raise DataError(f"{self.name}: cannot read {path} as SVHN .mat (X, y): {e}") from None
            out += [x, y]
        return tuple(out)
