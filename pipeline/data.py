"""Data sets: each config of conf/data names one of these dataclasses; `load(seed)` returns a Dataset.

Images are float32, channels last, divided by one scale decided on the stored training images and applied
to every split: none when they do not exceed 1, 255 for integer values up to 255, else their maximum.
Labels are int32 classes 0..K-1, each present in the training split; the test labels are among them.
The validation split is held out of the training data with the job's seed; the test split is used only
for reported metrics. A Dataset carries the digest of its content and warnings for conditions that are
legitimate but notable; data that would give wrong results is a one-line DataError instead.
Standard data sets (mnist, fashion_mnist, cifar10, cifar100, svhn) are read where keras.datasets keeps them
or from a system copy, and downloaded there on first use (see Standard).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from filelock import FileLock

from pipeline.config import ConfigError, require

log = logging.getLogger(__name__)

MAX_LABEL = 2**31 - 1  # labels are int32
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
KERAS_TMP = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())  # Keras's fallback home's parent
MIRROR_ENV = "PIPELINE_DATA_MIRROR"  # a base URL serving every file under its own name, e.g. a local mirror
TIMEOUT_S = 60  # per connection and per read: a stalled download fails instead of hanging
CHUNK = 1 << 20
AUGMENT_PAD = 4  # data.augment: random crops of the image zero-padded by this many pixels


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
    source: str = ""  # where it was read from (a path, or what produced it)
    name: str = ""
    class_names: list[str] = field(default_factory=list)  # label i's name, where the source names classes
    seed: int = 0  # the job's seed: it split off validation, and shuffles and augments training
    crop: int = 0  # augmentation in training only: a random crop of the image zero-padded by this many pixels
    flip: bool = False  # ... and a random left-right flip
    normalization: dict[str, list[float]] = field(default_factory=dict)  # per channel mean and std, if applied

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass
class DataSource:
    """Common options of every data set."""

    name: str = "digits"
    val_fraction: float = 0.15
    limit: int | None = None  # keep only the first N training examples (quick looks)
    normalize: bool = False  # per channel (x - mean) / std, both from the training split, on every split
    augment: bool = False  # training only: random crop (4-pixel padding) and, where flips() allows, left-right flip

    flips: ClassVar[bool] = True  # a mirrored image still shows its class (False for digits)

    def __post_init__(self):
        require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")
        require(self.limit is None or self.limit > 0, "limit", self.limit, "null or an integer > 0")

    def arrays(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """x_train, y_train, x_test, y_test as stored."""
        raise NotImplementedError

    def source(self) -> str:
        """Where the arrays come from (after arrays(): a path, or what produced them)."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def class_names(self) -> list[str]:
        """After arrays(): the name of each class 0..K-1, where the source names them."""
        return []

    def read_warnings(self) -> list[str]:
        """After arrays(): what reading them noted (e.g. files skipped)."""
        return []

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
        digest = _digest(x_train, y_train, x_test, y_test)
        fitted, x_val = x_train[train], x_train[val]
        stats = _channel_stats(fitted) if self.normalize else {}
        for x in (fitted, x_val, x_test) if stats else ():
            _standardize(x, stats)
        return Dataset(fitted, y_train[train], x_val, y_train[val], x_test, y_test, num_classes, digest=digest,
                       warnings=self.read_warnings() + warnings, source=self.source(), name=self.name,
                       class_names=self.class_names(), seed=seed, crop=AUGMENT_PAD if self.augment else 0,
                       flip=self.augment and self.flips, normalization=stats)

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


def _channel_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Per channel mean and std of x (float64 sums: the same data, the same numbers); a constant channel
    keeps std 1."""
    mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x.std(axis=(0, 1, 2), dtype=np.float64)
    return {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}


def _standardize(x: np.ndarray, stats: dict[str, list[float]]) -> None:
    """(x - mean) / std per channel, in place."""
    x -= np.asarray(stats["mean"], np.float32)
    x /= np.asarray(stats["std"], np.float32)


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
    flips: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")

    def source(self):
        return "sklearn.datasets.load_digits"

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

    def source(self):
        return str(Path(os.path.expanduser(self.path)).resolve())

    def arrays(self, seed):
        path = Path(os.path.expanduser(self.path))
        return _load_npz(_require_file(path, self.name, "set data.path to an .npz with x_train, y_train, "
                                       "x_test, y_test"), self.name)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what tf.io.decode_image reads


@dataclass
class Folder(DataSource):
    """Your own images: data.path holds one folder per class (names sorted -> classes 0..K-1), either inside
    train/ and test/, or as one tree split per file (a hash of its path below data.path, not the seed: every
    seed scores the same test images) with data.test_fraction to test. Each image is decoded by TensorFlow to
    data.channels (1 or 3) and resized to data.image_size, one file at a time into the arrays the pipeline
    uses: the images must fit in memory as float32 (data larger than memory is not supported yet). An
    unreadable image is one DataError naming it, or, with data.skip_bad=true, skipped and counted in a
    warning. Files with other suffixes and hidden files are ignored."""

    name: str = "folder"
    path: str = "???"
    image_size: list[int] = field(default_factory=lambda: [32, 32])  # height, width
    channels: int = 3
    test_fraction: float = 0.2
    skip_bad: bool = False

    def __post_init__(self):
        super().__post_init__()
        require(len(self.image_size) == 2 and min(self.image_size) > 0, "image_size", self.image_size,
                "[height, width], both > 0")
        require(self.channels in (1, 3), "channels", self.channels, "1 (grey) or 3 (RGB)")
        require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")
        self._names, self._skipped, self._total = [], [], 0

    def root(self) -> Path:
        return Path(os.path.expanduser(self.path)).resolve()

    def source(self):
        return str(self.root())

    def class_names(self):
        return self._names

    def read_warnings(self):
        if not self._skipped:
            return []
        return [f"{self.name}: skipped {len(self._skipped)} of {self._total} image(s) that cannot be decoded "
                f"(data.skip_bad=true): {', '.join(map(str, self._skipped[:3]))}{', ...' * (len(self._skipped) > 3)}"]

    def arrays(self, seed):
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{self.name}: not a folder: {root} (set data.path to a folder of one subfolder per "
                            "class, or with train/ and test/ holding those)")
        train, test = self._files(root)
        self._names = sorted({c for c, _ in train})
        unknown = sorted({c for c, _ in test} - set(self._names))
        if unknown:
            raise DataError(f"{self.name}: test class folder(s) {', '.join(unknown)} have no training images "
                            f"(training classes: {', '.join(self._names)})")
        self._skipped, self._total = [], len(train) + len(test)
        return (*self._decoded(train), *self._decoded(test))

    def _files(self, root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
        """(class name, file) of the training and the test images."""
        halves = [root / "train", root / "test"]
        if any(h.is_dir() for h in halves):
            missing = [h for h in halves if not h.is_dir()]
            if missing:
                raise DataError(f"{self.name}: {root} has {'test' if missing[0].name == 'train' else 'train'}/ "
                                f"but no {missing[0].name}/ (give both, or one folder per class to be split)")
            return self._images(halves[0]), self._images(halves[1])
        files = self._images(root)
        cut = [_unit_hash(p.relative_to(root).as_posix()) < self.test_fraction for _, p in files]
        return [f for f, t in zip(files, cut) if not t], [f for f, t in zip(files, cut) if t]

    def _images(self, tree: Path) -> list[tuple[str, Path]]:
        classes = sorted(d for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"{self.name}: {tree} has no class folders (one subfolder of images per class)")
        out = []
        for folder in classes:
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(tree).parts))
            if not files:
                raise DataError(f"{self.name}: class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += [(folder.name, p) for p in files]
        return out

    def _decoded(self, files: list[tuple[str, Path]]) -> tuple[np.ndarray, np.ndarray]:
        """The images as uint8 (N, H, W, C) and their labels, decoded one file at a time."""
        x = np.empty((len(files), *self.image_size, self.channels), np.uint8)
        y = np.empty(len(files), np.int32)
        index, n = {c: i for i, c in enumerate(self._names)}, 0
        for name, path in files:
            try:
                x[n] = _decode_image(path, self.image_size, self.channels)
            except Exception as e:
                if not self.skip_bad:
                    raise DataError(f"{self.name}: cannot decode {path} as an image ({_tf_reason(e)}): remove "
                                    "or replace it, or set data.skip_bad=true to skip such files") from None
                self._skipped.append(path)
                continue
            y[n], n = index[name], n + 1
        return x[:n], y[:n]


def _tf_reason(e: Exception) -> str:
    """A TensorFlow error's message without its op decorations, at most 200 characters."""
    return re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", _reason(e)).strip()[:200]


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def _decode_image(path: Path, size: list[int], channels: int) -> np.ndarray:
    """One image file as uint8 (H, W, C), resized (antialiased) when its size differs."""
    import tensorflow as tf

    image = tf.io.decode_image(path.read_bytes(), channels=channels, dtype=tf.uint8, expand_animations=False)
    if tuple(image.shape[:2]) != tuple(size):
        image = tf.round(tf.clip_by_value(tf.image.resize(image, size, antialias=True), 0, 255))
    return image.numpy()


# --- standard data sets: found where keras.datasets keeps them, in a system copy, or downloaded -----------

@dataclass(frozen=True)
class Remote:
    """One published file of a standard data set."""

    path: str  # where keras.datasets keeps it, relative to the data set's folder
    url: str
    checksum: str  # "<hashlib algorithm>:<hex digest>", as published
    unpack: str = ""  # an archive: extracted into this folder beside it, as keras.datasets does


def _remotes(folder: str, origin: str, algorithm: str, files: dict[str, str]) -> tuple[Remote, ...]:
    return tuple(Remote(f"{folder}{name}", origin + name, f"{algorithm}:{digest}") for name, digest in files.items())


# keras.datasets' origins, file names and checksums (keras 3.15). keras.datasets.fashion_mnist checks none: its
# files are Zalando's (same sizes), checked against Zalando's published MD5s. svhn (not in keras.datasets): the
# SVHN site's files and published MD5s (as torchvision checks them).
REMOTE: dict[str, tuple[Remote, ...]] = {
    "mnist": _remotes("", KERAS_ORIGIN, "sha256", {
        "mnist.npz": "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"}),
    "fashion_mnist": _remotes("fashion-mnist/", KERAS_ORIGIN, "md5", {
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79"}),
    "cifar10": (Remote("cifar-10-batches-py-target_archive", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                       unpack="cifar-10-batches-py-target"),),
    "cifar100": (Remote("cifar-100-python-target_archive", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "sha256:85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                        unpack="cifar-100-python-target"),),
    "svhn": _remotes("", "http://ufldl.stanford.edu/housenumbers/", "md5", {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}),
}
# Copies installed by the system, laid out as in the Keras cache: Debian's package dataset-fashion-mnist.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {"fashion_mnist": ("/usr/share/datasets",)}


def keras_cache() -> list[Path]:
    """The Keras cache as keras.utils.get_file picks it: $KERAS_HOME/datasets, else ~/.keras/datasets (/tmp/.keras
    when the home folder is not writable); when that Keras home is not writable, /tmp/.keras/datasets, listed
    second (the first is still read). Downloads go to the last."""
    if os.environ.get("KERAS_HOME"):
        home = Path(os.path.expanduser(os.environ["KERAS_HOME"]))
    else:
        user = Path(os.path.expanduser("~"))
        home = (user if os.access(user, os.W_OK) else KERAS_TMP) / ".keras"
    fallback = KERAS_TMP / ".keras"
    if _writable(home) or home == fallback:
        return [home / "datasets"]
    return [home / "datasets", fallback / "datasets"]


def _writable(path: Path) -> bool:
    """True when path is, or can be made, a folder we may write in (Keras makes its home when absent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK)


def _url(remote: Remote) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{remote.url.rsplit('/', 1)[1]}" if mirror else remote.url


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        text = f"HTTP {e.code} {e.reason}"
    elif isinstance(e, urllib.error.URLError):
        text = str(e.reason)
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, target: Path, checksum: str, dataset: str) -> None:
    """Download url to target: into a temporary file beside it, checked against checksum, then renamed, so
    target is absent or complete and verified. Any failure is one DataError naming url and target."""
    algorithm, expected = checksum.split(":", 1)
    digest, tmp = hashlib.new(algorithm), None
    by_hand = f"download it by hand to {target}"
    log.info("%s: downloading %s to %s", dataset, url, target)
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part",
                                         delete=False) as out:
            tmp = Path(out.name)
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != expected:
            raise DataError(f"{dataset}: the download of {url} does not match its published {algorithm} {expected} "
                            f"(got {digest.hexdigest()}); nothing was kept: {by_hand}")
        os.replace(tmp, target)
    except DataError:
        raise
    except Exception as e:  # offline, refused, HTTP error, timeout, truncated, disk full
        raise DataError(f"{dataset}: cannot download {url} ({_reason(e)}): {by_hand}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    log.info("%s: %s verified (%s)", dataset, target, algorithm)


def _unpack(archive: Path, folder: Path, dataset: str) -> None:
    """Extract archive into folder: into a temporary folder beside it, then renamed (replacing an incomplete one)."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except Exception as e:
        raise DataError(f"{dataset}: cannot extract {archive} into {folder} ({_reason(e)}): delete the archive to "
                        "download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Standard(DataSource):
    """A standard data set, with the files keras.datasets uses. They are looked for in data.root (null: the
    Keras cache, see keras_cache), then in system copies (SYSTEM_DIRS: Debian's dataset-fashion-mnist), else
    downloaded there on first use (data.download=true) from keras.datasets' origins (REMOTE; the environment
    variable PIPELINE_DATA_MIRROR replaces their base URL), checked against the published checksums; one
    process downloads while the others wait (a file lock beside the file). data.download=false never uses the
    network. A missing, failed or mismatched file is one DataError naming the URL and the path to place it at."""

    root: str | None = None
    download: bool = True

    layouts: ClassVar[tuple[str, ...]] = ("",)  # folders (in a base) that may hold the files; downloads: the first
    files: ClassVar[tuple[str, ...]] = ()
    in_cache: ClassVar[str] = ""  # the data set's folder in the Keras cache

    def source(self):
        return str(self.paths()[0].parent)

    def paths(self) -> list[Path]:
        """The data set's files, found or downloaded."""
        bases = [Path(os.path.expanduser(self.root))] if self.root else [c / self.in_cache for c in keras_cache()]
        system = [Path(d) for d in SYSTEM_DIRS.get(self.name, ())]
        for base in bases + system:
            for layout in self.layouts:
                found = [base / layout / f for f in self.files]
                if all(p.is_file() for p in found):
                    return found
        home = bases[-1]
        expected = [home / self.layouts[0] / f for f in self.files]
        for remote in REMOTE[self.name]:
            self._obtain(remote, home, expected if remote.unpack else [home / remote.path], system)
        return expected

    def _obtain(self, remote: Remote, home: Path, provides: list[Path], system: list[Path]) -> None:
        """Make the files `remote` provides present in home: download it (or extract it) unless they are."""
        missing = [p for p in provides if not p.is_file()]
        if not missing:
            return
        target, url = home / remote.path, _url(remote)
        if not self.download and not target.is_file():
            elsewhere = "".join(f" nor in {d / self.layouts[0]}" for d in system)
            raise DataError(f"{self.name}: file not found: {missing[0]}{elsewhere}; data.download=false: download "
                            f"{url} to {target} by hand, or set data.download=true")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self.name}: cannot create {target.parent} ({_reason(e)}) to download {url} into: "
                            "set data.root to a writable folder") from None
        with FileLock(f"{target}.lock"):  # one process downloads; the others wait, then find the file
            if all(p.is_file() for p in provides):
                return
            placed = target.is_file()
            if not placed:
                fetch(url, target, remote.checksum, self.name)
            if remote.unpack:
                algorithm, expected = remote.checksum.split(":", 1)
                if placed and _hash_file(target, algorithm) != expected:
                    raise DataError(f"{self.name}: {target} does not match the published {algorithm} of {url} "
                                    f"({expected}): delete it to download it again")
                _unpack(target, home / remote.unpack, self.name)


@dataclass
class Mnist(Standard):
    """keras.datasets.mnist: mnist.npz."""

    name: str = "mnist"
    files: ClassVar[tuple[str, ...]] = ("mnist.npz",)
    flips: ClassVar[bool] = False

    def arrays(self, seed):
        return _load_npz(self.paths()[0], self.name)


def _read_idx(path: Path, offset: int, dataset: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except Exception as e:
        raise DataError(f"{dataset}: cannot read {path} as gzipped IDX: {e}") from None


class _NoObjects(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow plain data and numpy arrays (their b'data'), never code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name) or np._core.multiarray._reconstruct


@dataclass
class FashionMnist(Standard):
    """keras.datasets.fashion_mnist: four gzipped IDX files in fashion-mnist/; Debian's package
    dataset-fashion-mnist installs them under /usr/share/datasets/fashion-mnist, found without network."""

    name: str = "fashion_mnist"
    layouts: ClassVar[tuple[str, ...]] = ("fashion-mnist",)
    files: ClassVar[tuple[str, ...]] = ("train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                                        "t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")

    def arrays(self, seed):
        out = []
        paths = self.paths()
        for labels, images in (paths[:2], paths[2:]):
            y = _read_idx(labels, 8, self.name)
            x = _read_idx(images, 16, self.name)
            if x.size != len(y) * 28 * 28:
                raise DataError(f"{self.name}: {images} holds {x.size} bytes, expected {len(y)} images of 28x28")
            out += [x.reshape(len(y), 28, 28), y]
        return tuple(out)


@dataclass
class Cifar10(Standard):
    """keras.datasets.cifar10: the python batches, extracted from cifar-10-python.tar.gz (or extracted by hand
    into data.root/cifar-10-batches-py)."""

    name: str = "cifar10"
    layouts: ClassVar[tuple[str, ...]] = ("cifar-10-batches-py-target/cifar-10-batches-py", "cifar-10-batches-py")
    files: ClassVar[tuple[str, ...]] = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    label_key: ClassVar[bytes] = b"labels"

    def arrays(self, seed):
        *train, test = (self._batch(p) for p in self.paths())
        return np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), *test

    def _batch(self, path: Path):
        try:
            with open(path, "rb") as f:
                batch = _NoObjects(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], np.uint8)
            return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[self.label_key])
        except Exception as e:
            raise DataError(f"{self.name}: cannot read {path} as a CIFAR python batch: {e}") from None


@dataclass
class Cifar100(Cifar10):
    """keras.datasets.cifar100: train and test, extracted from cifar-100-python.tar.gz; label_mode fine (100
    classes) or coarse (20 superclasses)."""

    name: str = "cifar100"
    label_mode: str = "fine"
    layouts: ClassVar[tuple[str, ...]] = ("cifar-100-python-target/cifar-100-python", "cifar-100-python")
    files: ClassVar[tuple[str, ...]] = ("train", "test")

    def __post_init__(self):
        super().__post_init__()
        require(self.label_mode in ("fine", "coarse"), "label_mode", self.label_mode, "fine or coarse")

    @property
    def label_key(self) -> bytes:
        return f"{self.label_mode}_labels".encode()


@dataclass
class Svhn(Standard):
    """SVHN's cropped digits: train_32x32.mat and test_32x32.mat (label 10 means digit 0) in data.root (null:
    svhn/ in the Keras cache), from the SVHN site."""

    name: str = "svhn"
    files: ClassVar[tuple[str, ...]] = ("train_32x32.mat", "test_32x32.mat")
    in_cache: ClassVar[str] = "svhn"
    flips: ClassVar[bool] = False

    def arrays(self, seed):
        from scipy.io import loadmat

        out = []
        for path in self.paths():
            try:
                mat = loadmat(path)
                x, y = np.transpose(mat["X"], (3, 0, 1, 2)), mat["y"].reshape(-1) % 10
            except Exception as e:
                raise DataError(f"{self.name}: cannot read {path} as SVHN .mat (X, y): {e}") from None
            out += [x, y]
        return tuple(out)
