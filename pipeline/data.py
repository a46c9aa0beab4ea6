"""Data sets: each config of conf/data names one of these dataclasses; `load(seed)` returns a Dataset, whose
splits the stages read as tf.data pipelines: an ArrayDataset holds its images in memory, a FolderDataset
(data=folder) only file names, decoding each image as it is read.

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
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from filelock import FileLock

from pipeline.config import ConfigError, require
from pipeline.files import cache_dir, replaced

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


SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """A loaded data set: labels in memory, images as tf.data pipelines per split (`examples`, `batches`), so
    the stages never care whether they come from arrays (ArrayDataset) or are decoded from files as they are
    read (FolderDataset)."""

    y_train: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    num_classes: int
    _: KW_ONLY
    digest: str = ""  # of the content as loaded (before the validation split)
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
        raise NotImplementedError

    @property
    def sizes(self) -> dict[str, int]:
        return {split: len(self.labels(split)) for split in SPLITS}

    def labels(self, split: str) -> np.ndarray:
        return getattr(self, f"y_{split}")

    def examples(self, split: str, shuffle_seed: int | None = None):
        """The split as a tf.data.Dataset of (float32 image, int32 label), in order, or shuffled anew on each
        iteration by shuffle_seed."""
        raise NotImplementedError

    def held(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The split's (images, labels) if they are held in memory as arrays, else None (streamed)."""
        return None

    def batches(self, split: str, batch_size: int):
        import tensorflow as tf

        return self.examples(split).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def sample(self, n: int) -> np.ndarray:
        """n test images, the first ones (repeated in turn when the split has fewer): model signatures, latency."""
        held = self.held("test")
        images = held[0][:n] if held is not None else first_batch(self.examples("test"), n)[0].numpy()
        return np.resize(images, (n, *images.shape[1:]))


def untuned(ds):
    """ds without tf.data's autotuning, for a pipeline with nothing to tune (indices, a batch read at once).
    An autotuned iterator runs a tuning thread, and deleting the iterator waits for that thread: up to half a
    second on a busy machine, which was half the time of every other job of a sweep outside its training."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def first_batch(examples, n: int):
    """The first n (image, label) of a tf.data.Dataset of examples, as tensors."""
    return next(iter(untuned(examples.batch(n))))


@dataclass
class ArrayDataset(Dataset):
    """Images held as float32 arrays (N, H, W, C), scaled and normalised as loaded."""

    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    def held(self, split):
        return getattr(self, f"x_{split}"), self.labels(split)

    def examples(self, split, shuffle_seed=None):
        import tensorflow as tf

        x = getattr(self, f"x_{split}")
        ds = tf.data.Dataset.from_tensor_slices((x, self.labels(split)))
        return ds if shuffle_seed is None else ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)


@dataclass
class FolderDataset(Dataset):
    """Images as files, decoded (to image_size and channels, scaled to [0, 1], normalised) in a parallel
    tf.data map each time they are read: only the file list and labels are held, whatever the data's size."""

    files_train: list[str]
    files_val: list[str]
    files_test: list[str]
    image_size: tuple[int, int]
    channels: int

    @property
    def input_shape(self):
        return (*self.image_size, self.channels)

    def examples(self, split, shuffle_seed=None):
        import tensorflow as tf

        files = getattr(self, f"files_{split}")
        ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(f) for f in files], self.labels(split)))
        if shuffle_seed is not None:  # the file names, before decoding: a buffer of names, not of images
            ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
        return ds.map(lambda path, y: (self._image(path), y), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)

    def _image(self, path):
        import tensorflow as tf

        x = tf.cast(_decode(tf.io.read_file(path), self.image_size, self.channels), tf.float32) / 255.0
        if self.normalization:
            x = (x - np.float32(self.normalization["mean"])) / np.float32(self.normalization["std"])
        return x


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
        warnings = self._coverage(num_classes, y_train[val], y_test)
        if x_test.max() > 1.0:
            warnings.append(f"{self.name}: test images reach {x_test.max():.4g} after division by {scale:g}, "
                            "the scale that brings the training images within 1")
        digest = arrays_digest(x_train, y_train, x_test, y_test)
        fitted, x_val = x_train[train], x_train[val]
        stats = _channel_stats(fitted) if self.normalize else {}
        for x in (fitted, x_val, x_test) if stats else ():
            _standardize(x, stats)
        return ArrayDataset(y_train[train], y_train[val], y_test, num_classes, x_train=fitted, x_val=x_val,
                            x_test=x_test, digest=digest, warnings=warnings, source=self.source(), name=self.name,
                            normalization=stats, **self._options(seed))

    def _options(self, seed: int) -> dict:
        return {"seed": seed, "crop": AUGMENT_PAD if self.augment else 0, "flip": self.augment and self.flips}

    def _coverage(self, num_classes: int, y_val: np.ndarray, y_test: np.ndarray) -> list[str]:
        """Warnings for classes absent from the validation or the test split."""
        return [f"{self.name}: class(es) {_few(absent)} have no example in the {split} split (size {len(y)}): "
                "its accuracy does not cover them"
                for split, y in (("validation", y_val), ("test", y_test)) if (absent := _absent(num_classes, y))]

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


def arrays_digest(*arrays: np.ndarray) -> str:
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


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the arrays of a data set in an .npz, in arrays()' order


def _load_npz(path: Path, dataset: str) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{dataset}: {path} lacks {', '.join(missing)} (needs {', '.join(NPZ_KEYS)})")
            return tuple(f[k] for k in NPZ_KEYS)
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
        """The split, from the user's cache where an earlier process left it (per scikit-learn version and
        test_fraction, checked by its digest): importing scikit-learn and splitting take a second of every
        process that loads digits, and the split never changes."""
        from importlib.metadata import version

        path = cache_dir() / f"digits-sklearn-{version('scikit-learn')}-test-{self.test_fraction}.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                cached = tuple(f[k] for k in NPZ_KEYS)
                if str(f["digest"]) == arrays_digest(*cached):
                    return cached
        except Exception:  # absent, or not as written: split again
            pass
        split = self._split_digits()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced(path) as part, open(part, "wb") as f:
                np.savez(f, **dict(zip(NPZ_KEYS, split)), digest=arrays_digest(*split))
        except OSError as e:  # a read-only or full cache: split in every process
            log.debug("digits: not cached in %s: %s", path, e)
        return split

    def _split_digits(self):
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
    seed scores the same test images) with data.test_fraction to test. Streamed: each image is decoded by
    TensorFlow to data.channels (1 or 3) and resized to data.image_size when a tf.data pipeline reads it
    (FolderDataset), so the data may be larger than memory. Loading reads every file once, in parallel and
    keeping none: an image that cannot be decoded is one DataError naming it, or, with data.skip_bad=true,
    skipped and counted in a warning; the same pass gives the digest (of the files' bytes and labels) and,
    with data.normalize, the training split's channel statistics. data.limit keeps the N training images
    whose path hashes lowest (a sample across classes). Other suffixes and hidden files are ignored."""

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

    def root(self) -> Path:
        return Path(os.path.expanduser(self.path)).resolve()

    def source(self):
        return str(self.root())

    def load(self, seed: int) -> FolderDataset:
        names, train, test = self._listed()
        files = train + test
        ok, hashes, sums = self._read_all([p for _, p in files])
        skipped = [p for (_, p), good in zip(files, ok) if not good]
        warnings = [f"{self.name}: skipped {len(skipped)} of {len(files)} image(s) that cannot be decoded "
                    f"(data.skip_bad=true): {', '.join(map(str, skipped[:3]))}{', ...' * (len(skipped) > 3)}"
                    ] if skipped else []
        keep_train, keep_test = np.flatnonzero(ok[: len(train)]), len(train) + np.flatnonzero(ok[len(train):])
        y = np.array([k for k, _ in files], np.int32)
        y_train, y_test = y[keep_train], y[keep_test]
        if absent := _absent(len(names), y_train):
            causes = [c for c, on in (("data.limit", self.limit), ("data.skip_bad", skipped)) if on]
            raise DataError(f"{self.name}: class folder(s) {', '.join(names[k] for k in absent)} have no training "
                            f"image left after {' and '.join(causes) or 'the test split'}: every class needs one")
        fit, val = self._split(y_train, len(names), seed)
        digest = hashlib.sha256(json.dumps(names).encode())  # the files' bytes and labels, in order, per split
        for split, kept in (("train", keep_train), ("test", keep_test)):
            digest.update(f";{split}:{len(kept)};".encode() + b"".join(int(y[i]).to_bytes(4, "little") + hashes[i]
                                                                      for i in kept))
        paths = [str(p) for _, p in files]
        return FolderDataset(
            y_train[fit], y_train[val], y_test, len(names), files_train=[paths[i] for i in keep_train[fit]],
            files_val=[paths[i] for i in keep_train[val]], files_test=[paths[i] for i in keep_test],
            image_size=tuple(self.image_size), channels=self.channels, digest=digest.hexdigest()[:16],
            warnings=warnings + self._coverage(len(names), y_train[val], y_test), source=str(self.root()),
            name=self.root().name or self.name, class_names=names, **self._options(seed),
            normalization=_folder_stats(sums[keep_train[fit]], self.image_size) if self.normalize else {})

    def _listed(self) -> tuple[list[str], list[tuple[int, Path]], list[tuple[int, Path]]]:
        """The class names, and (label, file) of the training (data.limit of them) and the test images."""
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{self.name}: not a folder: {root} (set data.path to a folder of one subfolder per "
                            "class, or with train/ and test/ holding those)")
        train, test = self._files(root)
        names = sorted({c for c, _ in train})
        unknown = sorted({c for c, _ in test} - set(names))
        if unknown:
            raise DataError(f"{self.name}: test class folder(s) {', '.join(unknown)} have no training images "
                            f"(training classes: {', '.join(names)})")
        if self.limit and self.limit < len(train):  # a sample across classes, the same for every seed
            order = sorted(range(len(train)), key=lambda i: _unit_hash(train[i][1].relative_to(root).as_posix()))
            train = [train[i] for i in sorted(order[: self.limit])]
        index = {c: i for i, c in enumerate(names)}
        return names, [(index[c], p) for c, p in train], [(index[c], p) for c, p in test]

    def _read_all(self, paths: list[Path]) -> tuple[np.ndarray, list[bytes], np.ndarray]:
        """Every file read and decoded once, in parallel, keeping none: which decode (bool per file), the sha256
        of their bytes, and their per channel sums of pixel values (uint8) and of their squares, (N, 2, C).
        Without data.skip_bad, the first file that does not decode is a DataError naming it."""
        import tensorflow as tf

        def read(i, path):
            contents = tf.io.read_file(path)
            x = tf.cast(_decode(contents, self.image_size, self.channels), tf.int64)
            return i, contents, tf.stack([tf.reduce_sum(x, [0, 1]), tf.reduce_sum(x * x, [0, 1])])

        ok, hashes = np.zeros(len(paths), bool), [b""] * len(paths)
        sums = np.zeros((len(paths), 2, self.channels), np.int64)
        ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), [os.fsencode(p) for p in paths]))
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()  # bad: dropped
        expected = 0
        for i, contents, s in ds.as_numpy_iterator():
            if i != expected and not self.skip_bad:
                break
            ok[i], hashes[i], sums[i], expected = True, hashlib.sha256(contents).digest(), s, i + 1
        if not self.skip_bad and expected < len(paths):
            raise DataError(f"{self.name}: cannot decode {paths[expected]} as an image ({self._why(paths[expected])}"
                            "): remove or replace it, or set data.skip_bad=true to skip such files")
        return ok, hashes, sums

    def _why(self, path: Path) -> str:
        """Why TensorFlow cannot decode the file."""
        import tensorflow as tf

        try:
            _decode(tf.io.read_file(os.fsencode(path)), self.image_size, self.channels)
        except Exception as e:
            return _tf_reason(e)
        return "it failed while reading all files"

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


def _folder_stats(sums: np.ndarray, image_size: list[int]) -> dict[str, list[float]]:
    """Per channel mean and std of the images scaled to [0, 1], from their per file sums (N, 2, C) of uint8
    values and of their squares: exact integers, so the same files give the same numbers in any order."""
    total = sums.sum(axis=0).astype(np.float64)  # exact below 2**53
    n = len(sums) * image_size[0] * image_size[1]
    mean = total[0] / n / 255.0
    std = np.sqrt(np.maximum(total[1] / n / 255.0**2 - mean**2, 0))
    return {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}


def _tf_reason(e: Exception) -> str:
    """A TensorFlow error's message without its op decorations, at most 200 characters."""
    return re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", _reason(e)).strip()[:200]


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def _decode(contents, size, channels: int):
    """One encoded image as a uint8 (H, W, C) tensor, resized (antialiased, rounded) when its size differs;
    eager or inside a tf.data map."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=channels, dtype=tf.uint8, expand_animations=False)

    def resized():
        return tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, size, antialias=True)), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    return tf.ensure_shape(tf.cond(same, lambda: image, resized), [*size, channels])


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
