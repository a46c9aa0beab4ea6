"""Each real data format, written small into tmp_path in its standard layout and read by the same code:
shapes, dtype, range, labels, the validation split, determinism; one-line DataErrors for files that
are missing or malformed (including pickles that reference code) and for data that reads fine but would
give wrong results (empty training split, labels that wrap or skip classes, test classes never trained
on); one scale for every split; the content digest."""

import gzip
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import one_line_error, run_pipeline

from pipeline.data import Cifar10, DataError, Digits, FashionMnist, Mnist, Npz, Svhn

N_TRAIN, N_TEST = 40, 12


def images(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def labels(n, seed, high=10, first=0):
    y = np.arange(first, first + n) % high  # every class present, so num_classes is known
    return np.random.default_rng(seed).permutation(y).astype(np.uint8)


# --- writers: the standard on-disk formats -------------------------------------------------------------

def write_npz(path, n_train=N_TRAIN, n_test=N_TEST, shape=(28, 28), **overrides):
    arrays = {"x_train": images(n_train, shape, 1), "y_train": labels(n_train, 2),
              "x_test": images(n_test, shape, 3), "y_test": labels(n_test, 4)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def write_idx(path, array, label_file: bool):
    """IDX: magic (0x0801 for uint8 vectors, 0x0803 for uint8 rank-3), big-endian sizes, then the bytes."""
    header = (struct.pack(">II", 0x0801, len(array)) if label_file
              else struct.pack(">IIII", 0x0803, *array.shape))
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root):
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    out = {}
    for prefix, n, seed in (("train", N_TRAIN, 10), ("t10k", N_TEST, 20)):
        x, y = images(n, (28, 28), seed), labels(n, seed + 1)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x, label_file=False)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y, label_file=True)
        out[prefix] = (x, y)
    return out


def cifar_batch(n, seed, first=0):
    return {b"batch_label": b"batch", b"labels": [int(v) for v in labels(n, seed + 1, first=first)],
            b"data": images(n, (3072,), seed), b"filenames": [b"f%d.png" % i for i in range(n)]}


def cifar_bytes(batch, python2_names=False):
    """Protocol 3 (plain GLOBAL opcodes); python2_names names numpy's module as the original files do."""
    raw = pickle.dumps(batch, protocol=3)
    if python2_names:
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return raw


def cifar_dir(root):
    return root / "cifar-10-batches-py-target" / "cifar-10-batches-py"


def write_cifar(root, python2_names=False, per_batch=8):
    d = cifar_dir(root)
    d.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, i, first=(i - 1) * per_batch) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(N_TEST, 99)
    for name, batch in batches.items():
        (d / name).write_bytes(cifar_bytes(batch, python2_names))
    return batches


def write_svhn(root):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", N_TRAIN, 30), ("test", N_TEST, 40)):
        x = images(n, (32, 32, 3), seed)
        y = labels(n, seed + 1) + 0  # 0..9
        stored_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(n, 1)  # SVHN writes digit 0 as 10
        savemat(root / f"{split}_32x32.mat", {"X": np.transpose(x, (1, 2, 3, 0)), "y": stored_y})
        out[split] = (x, y)
    return out


# --- checks shared by every format ---------------------------------------------------------------------

def check_dataset(ds, n_train, n_test, shape, val_fraction, x_test=None, y_test=None, num_classes=10):
    n_val = max(1, int(round(val_fraction * n_train)))
    assert len(ds.x_val) == len(ds.y_val) == n_val
    assert len(ds.x_train) == len(ds.y_train) == n_train - n_val
    assert len(ds.x_test) == len(ds.y_test) == n_test
    assert ds.input_shape == shape
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == np.float32 and x.shape[1:] == shape
        assert 0.0 <= x.min() and x.max() <= 1.0
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and y.max() < num_classes
    assert ds.num_classes == num_classes
    assert len(ds.digest) == 16 and int(ds.digest, 16) >= 0
    if x_test is not None:  # the test split is kept in order, scaled by 1/255
        np.testing.assert_allclose(ds.x_test, x_test.reshape(ds.x_test.shape) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y_test, y_test)


def check_split_is_by_seed(source, x_train_stored):
    a, b, c = source.load(0), source.load(0), source.load(1)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.x_val, c.x_val)
    np.testing.assert_array_equal(a.x_test, c.x_test)
    # train and val partition the stored training images exactly
    together = np.concatenate([a.x_train, a.x_val]).reshape(len(x_train_stored), -1)
    stored = (x_train_stored.reshape(len(x_train_stored), -1) / 255.0).astype(np.float32)
    assert sorted(map(bytes, together)) == sorted(map(bytes, stored))


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """A data set that would download asks a closed loopback port, into a Keras cache under tmp_path."""
    import socket

    from pipeline import data

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})


# --- the formats --------------------------------------------------------------------------------------

def test_mnist_npz_in_the_keras_cache(tmp_path):
    arrays = write_npz(tmp_path / "mnist.npz")
    source = Mnist(root=str(tmp_path), val_fraction=0.25)
    check_dataset(source.load(0), N_TRAIN, N_TEST, (28, 28, 1), 0.25, arrays["x_test"], arrays["y_test"])
    check_split_is_by_seed(source, arrays["x_train"])


def test_mnist_limit_keeps_the_first_examples(tmp_path):
    arrays = write_npz(tmp_path / "mnist.npz", y_train=np.arange(N_TRAIN) % 10)
    ds = Mnist(root=str(tmp_path), val_fraction=0.1, limit=20).load(0)
    assert len(ds.x_train) + len(ds.x_val) == 20 and len(ds.x_test) == N_TEST
    together = np.concatenate([ds.x_train, ds.x_val]).reshape(20, -1)
    stored = (arrays["x_train"][:20].reshape(20, -1) / 255.0).astype(np.float32)
    assert sorted(map(bytes, together)) == sorted(map(bytes, stored))


def test_fashion_mnist_idx_files(tmp_path):
    stored = write_fashion(tmp_path)
    source = FashionMnist(root=str(tmp_path), val_fraction=0.1)
    check_dataset(source.load(0), N_TRAIN, N_TEST, (28, 28, 1), 0.1, *stored["t10k"])
    check_split_is_by_seed(source, stored["train"][0])


@pytest.mark.parametrize("python2_names", [False, True], ids=["numpy2-pickle", "original-python2-names"])
def test_cifar10_python_batches(tmp_path, python2_names):
    batches = write_cifar(tmp_path, python2_names)
    source = Cifar10(root=str(tmp_path), val_fraction=0.2)
    test = batches["test_batch"]
    x_test = np.asarray(test[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    check_dataset(source.load(0), 40, N_TEST, (32, 32, 3), 0.2, x_test, np.array(test[b"labels"]))
    x_train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    check_split_is_by_seed(source, x_train.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar10_batches_directly_under_root(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(cifar_bytes(cifar_batch(8, len(name))))
    assert Cifar10(root=str(tmp_path)).load(0).input_shape == (32, 32, 3)


def test_svhn_mat_files(tmp_path):
    stored = write_svhn(tmp_path / "svhn")
    source = Svhn(root=str(tmp_path / "svhn"), val_fraction=0.1)
    ds = source.load(0)
    check_dataset(ds, N_TRAIN, N_TEST, (32, 32, 3), 0.1, *stored["test"])
    assert 0 in ds.y_test and 10 not in ds.y_test  # label 10 means digit 0
    check_split_is_by_seed(source, stored["train"][0])


def test_npz_any_file(tmp_path):
    path = tmp_path / "any.npz"
    x_train = np.random.default_rng(0).random((30, 8, 8, 3)).astype(np.float32)  # already in [0, 1]
    x_test = np.random.default_rng(1).random((N_TEST, 8, 8, 3))
    arrays = write_npz(path, n_train=30, x_train=x_train, y_train=labels(30, 5, high=3),
                       x_test=x_test, y_test=labels(N_TEST, 6, high=3))
    ds = Npz(path=str(path), val_fraction=0.2).load(0)
    check_dataset(ds, 30, N_TEST, (8, 8, 3), 0.2, num_classes=3)
    np.testing.assert_allclose(ds.x_test, arrays["x_test"].astype(np.float32))  # not rescaled
    together = np.concatenate([ds.x_train, ds.x_val])
    assert sorted(map(bytes, together)) == sorted(map(bytes, x_train))


def test_array_splits_stream_as_stored(tmp_path):
    """The stages read every data set through its tf.data pipelines: an array data set's are its arrays."""
    ds = npz(tmp_path, y_train=np.arange(N_TRAIN) % 10)(val_fraction=0.25).load(0)
    assert ds.sizes == {"train": len(ds.y_train), "val": len(ds.y_val), "test": N_TEST}
    for split in ("train", "val", "test"):
        x, y = (np.concatenate(part) for part in zip(*((x.numpy(), y.numpy()) for x, y in ds.batches(split, 7))))
        np.testing.assert_array_equal(x, getattr(ds, f"x_{split}"))
        np.testing.assert_array_equal(y, ds.labels(split))
    shuffled = [y.numpy() for _, y in ds.examples("train", shuffle_seed=3)]
    assert sorted(shuffled) == sorted(ds.y_train) and shuffled != ds.y_train.tolist()
    np.testing.assert_array_equal(ds.sample(N_TEST + 3), np.concatenate([ds.x_test, ds.x_test[:3]]))


# --- missing files: a one-line DataError naming the path (data.download=false; downloads: test_download.py)

FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_missing_mnist_names_the_file(tmp_path):
    one_line_error(lambda: Mnist(root=str(tmp_path), download=False).load(0), tmp_path / "mnist.npz", "not found")


def test_missing_npz_names_the_file(tmp_path):
    one_line_error(lambda: Npz(path=str(tmp_path / "nope.npz")).load(0), tmp_path / "nope.npz", "not found")


@pytest.mark.parametrize("name", FASHION_FILES)
def test_missing_fashion_file_names_it(tmp_path, name):
    write_fashion(tmp_path)
    (tmp_path / "fashion-mnist" / name).unlink()
    one_line_error(lambda: FashionMnist(root=str(tmp_path), download=False).load(0),
                   tmp_path / "fashion-mnist" / name, "not found")


@pytest.mark.parametrize("name", CIFAR_FILES)
def test_missing_cifar_file_names_it(tmp_path, name):
    write_cifar(tmp_path)
    (cifar_dir(tmp_path) / name).unlink()
    one_line_error(lambda: Cifar10(root=str(tmp_path), download=False).load(0), cifar_dir(tmp_path) / name)


def test_missing_cifar_folder_names_the_expected_path(tmp_path):
    one_line_error(lambda: Cifar10(root=str(tmp_path), download=False).load(0), cifar_dir(tmp_path) / "data_batch_1",
                   tmp_path / "cifar-10-batches-py-target_archive")


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_svhn_file_names_it(tmp_path, split):
    write_svhn(tmp_path)
    (tmp_path / f"{split}_32x32.mat").unlink()
    one_line_error(lambda: Svhn(root=str(tmp_path), download=False).load(0), tmp_path / f"{split}_32x32.mat")


# --- malformed files: a one-line DataError -------------------------------------------------------------

GARBAGE = b"this is not a data file \x00\xff\x13" * 20


def test_garbage_npz(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(GARBAGE)
    one_line_error(lambda: Mnist(root=str(tmp_path)).load(0), tmp_path / "mnist.npz")


def test_npz_missing_keys(tmp_path):
    write_npz(tmp_path / "d.npz", y_test=None, x_test=None)
    one_line_error(lambda: Npz(path=str(tmp_path / "d.npz")).load(0), "x_test", "y_test")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    write_npz(tmp_path / "d.npz", y_train=np.array([{"a": 1}] * N_TRAIN, dtype=object))
    one_line_error(lambda: Npz(path=str(tmp_path / "d.npz")).load(0), tmp_path / "d.npz")


@pytest.mark.parametrize("split", ["train", "test"])
def test_npz_mismatched_lengths(tmp_path, split):
    write_npz(tmp_path / "d.npz", **{f"y_{split}": labels(5, 0)})
    one_line_error(lambda: Npz(path=str(tmp_path / "d.npz")).load(0), "images but", "labels")


def test_npz_train_and_test_shapes_differ(tmp_path):
    write_npz(tmp_path / "d.npz", x_test=images(N_TEST, (20, 20), 0))
    one_line_error(lambda: Npz(path=str(tmp_path / "d.npz")).load(0), "differ in shape")


def test_npz_negative_labels(tmp_path):
    write_npz(tmp_path / "d.npz", y_train=np.full(N_TRAIN, -1))
    one_line_error(lambda: Npz(path=str(tmp_path / "d.npz")).load(0), ">= 0")


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_fashion_garbage(tmp_path, name):
    write_fashion(tmp_path)
    (tmp_path / "fashion-mnist" / name).write_bytes(GARBAGE)
    one_line_error(lambda: FashionMnist(root=str(tmp_path)).load(0), tmp_path / "fashion-mnist" / name)


def test_fashion_truncated_images(tmp_path):
    write_fashion(tmp_path)
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    write_idx(path, images(N_TRAIN - 3, (28, 28), 0), label_file=False)
    one_line_error(lambda: FashionMnist(root=str(tmp_path)).load(0), path, "28x28")


def test_cifar_garbage(tmp_path):
    write_cifar(tmp_path)
    path = cifar_dir(tmp_path) / "data_batch_3"
    path.write_bytes(GARBAGE)
    one_line_error(lambda: Cifar10(root=str(tmp_path)).load(0), path)


def test_cifar_missing_key(tmp_path):
    write_cifar(tmp_path)
    path = cifar_dir(tmp_path) / "test_batch"
    path.write_bytes(cifar_bytes({b"data": images(4, (3072,), 0)}))
    one_line_error(lambda: Cifar10(root=str(tmp_path)).load(0), path)


def test_cifar_mismatched_lengths(tmp_path):
    write_cifar(tmp_path)
    path = cifar_dir(tmp_path) / "test_batch"
    path.write_bytes(cifar_bytes({b"data": images(4, (3072,), 0), b"labels": [1, 2, 3]}))
    one_line_error(lambda: Cifar10(root=str(tmp_path)).load(0), "images but")


class Payload:
    """Unpickling this would call os.system: the loader must refuse before anything runs."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


class Plain:
    pass


@pytest.mark.parametrize("evil", [Payload(), Plain()], ids=["reduce-to-os.system", "class-instance"])
def test_cifar_pickle_with_object_references_is_refused(tmp_path, monkeypatch, evil):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path)
    path = cifar_dir(tmp_path) / "data_batch_1"
    batch = {b"data": images(8, (3072,), 0), b"labels": [0] * 8, b"x": evil}
    path.write_bytes(pickle.dumps(batch, protocol=3))
    msg = one_line_error(lambda: Cifar10(root=str(tmp_path)).load(0), path, "refusing")
    assert "refusing to load" in msg
    assert not (tmp_path / "PWNED").exists()


def test_svhn_garbage(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(GARBAGE)
    one_line_error(lambda: Svhn(root=str(tmp_path)).load(0), tmp_path / "train_32x32.mat")


def test_svhn_missing_variable(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    one_line_error(lambda: Svhn(root=str(tmp_path)).load(0), tmp_path / "test_32x32.mat")


# --- the CLI ------------------------------------------------------------------------------------------

def test_cli_missing_data_file_exits_2_with_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "absent.npz"
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "data=npz", f"data.path={missing}",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/o"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.db").exists()


# --- data that reads fine but would give wrong results: one-line DataError, or a warning ----------------

def npz(tmp_path, **overrides):
    """An Npz source over a file written with these arrays (the rest as write_npz makes them)."""
    write_npz(tmp_path / "d.npz", **overrides)
    return lambda **options: Npz(path=str(tmp_path / "d.npz"), **options)


@pytest.mark.parametrize("options, named", [({"limit": 1}, "data.limit=1"),
                                            ({"val_fraction": 0.9999}, "data.val_fraction=0.9999")])
def test_empty_training_split(tmp_path, options, named):
    source = npz(tmp_path)(**options)
    one_line_error(lambda: source.load(0), named, "leave 0 for training", "at least one of each")


def test_limit_that_drops_a_class_names_data_limit(tmp_path):
    source = npz(tmp_path)(limit=6, val_fraction=0.2)  # 5 training examples cannot hold 10 classes
    one_line_error(lambda: source.load(0), "data.limit=6", "no example among the 5 training examples",
                   "raise data.limit")


def test_class_whose_only_example_is_held_out_for_validation(tmp_path):
    y = np.arange(N_TRAIN) % 3
    y[0] = 3  # class 3 has one example: some seeds put it in the validation split
    source = npz(tmp_path, y_train=y, y_test=labels(N_TEST, 4, high=3))(val_fraction=0.5)
    outcomes = []
    for seed in range(12):
        try:
            ds = source.load(seed)
            assert 3 in ds.y_train
            outcomes.append("trained")
        except DataError as e:
            assert "class(es) 3 of 0..3 have no example" in str(e) and "lower data.val_fraction" in str(e)
            outcomes.append("error")
    assert set(outcomes) == {"trained", "error"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_that_would_wrap_in_int32(tmp_path, split):
    y = labels(N_TRAIN if split == "train" else N_TEST, 0).astype(np.int64)
    y[3] = 2**32  # as int32 it would become 0 and merge with class 0
    source = npz(tmp_path, **{f"y_{split}": y})()
    one_line_error(lambda: source.load(0), "< 2**31", str(2**32), "training data" if split == "train" else "test")


def test_non_contiguous_label(tmp_path):
    y = labels(N_TRAIN, 2).astype(np.int64)
    y[5] = 200000  # today: a 200001-class model
    source = npz(tmp_path, y_train=y)()
    msg = one_line_error(lambda: source.load(0), "largest label is 200000", "0..200000", "remap",
                         "training data")
    assert "199990 of 0..200000 never occur" in msg and "..., 199999" in msg, msg


def test_test_class_absent_from_training(tmp_path):
    source = npz(tmp_path, y_train=labels(N_TRAIN, 2, high=8), y_test=labels(N_TEST, 4, high=10))()
    one_line_error(lambda: source.load(0), "test data", "class(es) 8, 9 never occur in the training data",
                   "0..7")


def test_class_absent_from_validation_is_a_warning(tmp_path):
    ds = npz(tmp_path)(val_fraction=0.025).load(0)  # one validation example: nine classes absent
    assert len(ds.y_val) == 1 and ds.num_classes == 10
    absent = sorted(set(range(10)) - {int(ds.y_val[0])})
    assert ds.warnings == [f"npz: class(es) {', '.join(map(str, absent))} have no example in the validation "
                           "split (size 1): its accuracy does not cover them"]


def test_clean_data_has_no_warnings():
    assert Digits().load(0).warnings == []


@pytest.mark.parametrize("dtype, train_top, test_top, scale", [
    (np.int16, 3000, 2000, 3000),      # raw values: the training maximum, for every split
    (np.float32, 3000.5, 2000, 3000.5),
    (np.uint8, 200, 255, 255),         # 8-bit images: 255, whatever the training maximum
    (np.float64, 200, 255, 255),       # 8-bit values stored as floats
    (np.float32, 0.5, 0.9, 1),         # already within [0, 1]: as stored
])
def test_one_scale_for_every_split(tmp_path, dtype, train_top, test_top, scale):
    rng = np.random.default_rng(0)
    values = rng.random((N_TRAIN, 6, 6)) * train_top
    x_train = (values.round() if train_top > 1 else values).astype(dtype)
    x_train[-1, 0, 0] = train_top  # the maximum sits past data.limit: the limit does not change the scale
    x_test = np.zeros((N_TEST, 6, 6), dtype)
    x_test[0, 0, 0] = test_top
    source = npz(tmp_path, x_train=x_train, y_train=np.arange(N_TRAIN) % 10, x_test=x_test)
    for options in ({}, {"limit": 30}):
        ds = source(val_fraction=0.2, **options).load(0)
        n = len(ds.x_train) + len(ds.x_val)
        expected = (x_train[:n].astype(np.float32) / np.float32(scale)).reshape(n, -1)
        together = np.concatenate([ds.x_train, ds.x_val]).reshape(n, -1)
        assert sorted(map(bytes, together)) == sorted(map(bytes, expected))
        np.testing.assert_array_equal(ds.x_test, (x_test.astype(np.float32) / np.float32(scale))[..., None])
        assert not any("test images" in w for w in ds.warnings)


def test_test_images_beyond_the_training_scale_give_a_warning(tmp_path):
    x_train = np.full((N_TRAIN, 6, 6), 3000, np.int16)
    x_test = np.full((N_TEST, 6, 6), 4500, np.int16)
    ds = npz(tmp_path, x_train=x_train, x_test=x_test)().load(0)
    assert ds.x_train.max() == 1.0 and ds.x_test.max() == 1.5
    assert ds.warnings[-1:] == ["npz: test images reach 1.5 after division by 3000, the scale that brings "
                                "the training images within 1"]


def test_digest_follows_the_content(tmp_path):
    path = tmp_path / "d.npz"
    arrays = write_npz(path)
    source = Npz(path=str(path))
    first = source.load(0).digest
    assert len(first) == 16
    assert source.load(1).digest == first  # the split (by the seed) is not part of it
    np.savez(path, **arrays)  # the same content written again
    assert source.load(0).digest == first
    np.savez(tmp_path / "copy.npz", **arrays)
    assert Npz(path=str(tmp_path / "copy.npz")).load(0).digest == first  # content, not path
    changed = {**arrays, "x_train": arrays["x_train"].copy()}
    changed["x_train"][7, 3, 3] ^= 1
    np.savez(path, **changed)
    assert source.load(0).digest != first
    reshaped = {**arrays, "x_train": arrays["x_train"].reshape(N_TRAIN, 14, 56),
                "x_test": arrays["x_test"].reshape(N_TEST, 14, 56)}
    np.savez(path, **reshaped)  # the same bytes in another shape
    assert source.load(0).digest != first
    relabelled = {**arrays, "y_test": np.roll(arrays["y_test"], 1)}
    np.savez(path, **relabelled)
    assert source.load(0).digest != first
    assert Npz(path=str(path), limit=30).load(0).digest != source.load(0).digest  # the examples used


def test_cli_data_error_exits_2_with_one_line_and_writes_nothing(tmp_path):
    y = labels(N_TRAIN, 2).astype(np.int64)
    y[5] = 200000
    write_npz(tmp_path / "d.npz", y_train=y)
    proc = run_pipeline(["data=npz", f"data.path={tmp_path / 'd.npz'}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: npz training data") and "remap" in lines[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_digits_split_is_cached_per_sklearn_version_and_checked(tmp_path, monkeypatch):
    """The split is computed once and read back from the user's cache; a damaged or forged copy is split again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = Digits().arrays(0)
    [cached] = (tmp_path / "pipeline").glob("digits-sklearn-*-test-0.2.npz")
    calls = []
    split = Digits._split_digits
    monkeypatch.setattr(Digits, "_split_digits", lambda self: calls.append(1) or split(self))
    for a, b in zip(Digits().arrays(0), first, strict=True):
        np.testing.assert_array_equal(a, b)
    assert calls == []  # read from the cache
    with np.load(cached) as f:
        saved = dict(f)
    saved["y_test"] = (saved["y_test"] + 1) % 10  # other labels under the old digest
    np.savez(cached, **saved)
    for a, b in zip(Digits().arrays(0), first, strict=True):
        np.testing.assert_array_equal(a, b)
    assert calls == [1]
    cached.write_bytes(b"not an npz")
    assert all(np.array_equal(a, b) for a, b in zip(Digits().arrays(0), first, strict=True)) and calls == [1, 1]
    assert len(Digits(test_fraction=0.3).arrays(0)[3]) != len(first[3])  # another split, its own file
