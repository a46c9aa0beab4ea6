"""Standard data sets on first use: small files in the real formats (mnist.npz, gzipped IDX, CIFAR tarballs,
SVHN .mat) served from a loopback HTTP server, never the network. First use downloads into the Keras cache
($KERAS_HOME), verifies and loads; the second does not download; a wrong checksum, a closed port or an HTTP
error is one line naming the URL and the path to place the file at, and leaves no file; data.download=false
never connects; a system copy (Debian's dataset-fashion-mnist) is used; two processes download once; a sweep
downloads before its jobs start. The table of origins and checksums is keras.datasets' own."""

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import test_data as formats
from conftest import REPO, one_line_error, run_pipeline

from pipeline import data
from pipeline.data import Cifar10, Cifar100, FashionMnist, Mnist, Svhn


class Server:
    """A loopback HTTP server of named files that counts the requests for each."""

    def __init__(self, delay: float = 0.0):
        self.files: dict[str, bytes] = {}
        self.hits: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits[name] += 1
                time.sleep(delay)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    """A fresh Keras cache, no system copies, and any download that a test did not serve refused."""
    home = tmp_path / "keras"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})
    return home


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv(data.MIRROR_ENV, s.url)
    yield s
    s.close()


def checksum_like(published: str, body: bytes) -> str:
    algorithm = published.split(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def publish(monkeypatch, server, name: str, files: dict[str, bytes], corrupt: bool = False) -> None:
    """Serve `files` (by the remote URL's file name) as data set `name`, with their checksums in the table."""
    remotes = []
    for remote in data.REMOTE[name]:
        body = files[remote.url.rsplit("/", 1)[1]]
        remotes.append(dataclasses.replace(remote, checksum=checksum_like(remote.checksum, body + b"x" * corrupt)))
        if server is not None:
            server.files[remote.url.rsplit("/", 1)[1]] = body
    monkeypatch.setitem(data.REMOTE, name, tuple(remotes))


# --- the real formats, small ---------------------------------------------------------------------------

def tarball(folder: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def mnist_files(tmp_path):
    arrays = formats.write_npz(tmp_path / "mnist.npz")
    return {"mnist.npz": (tmp_path / "mnist.npz").read_bytes()}, arrays["y_test"]


def fashion_files(tmp_path):
    stored = formats.write_fashion(tmp_path / "src")
    return ({p.name: p.read_bytes() for p in (tmp_path / "src" / "fashion-mnist").iterdir()}, stored["t10k"][1])


def cifar10_files(tmp_path):
    batches = {f"data_batch_{i}": formats.cifar_batch(8, i, first=(i - 1) * 8) for i in range(1, 6)}
    batches["test_batch"] = formats.cifar_batch(formats.N_TEST, 99)
    members = {k: formats.cifar_bytes(v) for k, v in batches.items()}
    return {"cifar-10-python.tar.gz": tarball("cifar-10-batches-py", members)}, batches["test_batch"][b"labels"]


def cifar100_batch(n, seed):
    fine = formats.labels(n, seed, high=20)
    return {b"data": formats.images(n, (3072,), seed), b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 4 for v in fine], b"filenames": [b"f%d.png" % i for i in range(n)]}


def cifar100_files(tmp_path):
    train, test = cifar100_batch(formats.N_TRAIN, 1), cifar100_batch(formats.N_TEST, 2)
    members = {"train": formats.cifar_bytes(train), "test": formats.cifar_bytes(test)}
    return {"cifar-100-python.tar.gz": tarball("cifar-100-python", members)}, test[b"fine_labels"]


def svhn_files(tmp_path):
    stored = formats.write_svhn(tmp_path / "src")
    return {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}, stored["test"][1]


# name: (source class, files served, where keras.datasets keeps them under $KERAS_HOME/datasets)
SETS = {
    "mnist": (Mnist, mnist_files, ["mnist.npz"]),
    "fashion_mnist": (FashionMnist, fashion_files, [f"fashion-mnist/{f}" for f in FashionMnist.files]),
    "cifar10": (Cifar10, cifar10_files, ["cifar-10-batches-py-target_archive"]
                + [f"cifar-10-batches-py-target/cifar-10-batches-py/{f}" for f in Cifar10.files]),
    "cifar100": (Cifar100, cifar100_files, ["cifar-100-python-target_archive",
                                            "cifar-100-python-target/cifar-100-python/train",
                                            "cifar-100-python-target/cifar-100-python/test"]),
    "svhn": (Svhn, svhn_files, ["svhn/train_32x32.mat", "svhn/test_32x32.mat"]),
}


def left_behind(folder: Path) -> list[str]:
    """Files other than lock files: partial downloads or extractions would show here."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock")


# --- first use downloads, second use does not ---------------------------------------------------------

@pytest.mark.parametrize("name", SETS)
def test_first_use_downloads_verifies_and_loads_then_reuses(tmp_path, monkeypatch, server, keras_home, name):
    cls, make, kept = SETS[name]
    files, y_test = make(tmp_path)
    publish(monkeypatch, server, name, files)
    ds = cls().load(0)
    assert dict(server.hits) == dict.fromkeys(files, 1)
    np.testing.assert_array_equal(ds.y_test, np.asarray(y_test) % 10 if name == "svhn" else y_test)
    assert len(ds.x_test) == formats.N_TEST and len(ds.x_train) + len(ds.x_val) == formats.N_TRAIN
    assert left_behind(keras_home / "datasets") == sorted(kept)  # keras.datasets' layout, nothing else
    again = cls().load(0)
    assert dict(server.hits) == dict.fromkeys(files, 1)  # found in the cache: no second download
    assert again.digest == ds.digest
    assert cls(download=False).load(0).digest == ds.digest


def test_cifar100_coarse_labels(tmp_path, monkeypatch, server):
    files, fine = cifar100_files(tmp_path)
    publish(monkeypatch, server, "cifar100", files)
    ds = Cifar100(label_mode="coarse").load(0)
    assert ds.num_classes == 5
    np.testing.assert_array_equal(ds.y_test, np.asarray(fine) // 4)


def test_an_incomplete_extraction_is_extracted_again_from_the_kept_archive(tmp_path, monkeypatch, server,
                                                                          keras_home):
    files, _ = cifar10_files(tmp_path)
    publish(monkeypatch, server, "cifar10", files)
    first = Cifar10().load(0)
    (keras_home / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert Cifar10(download=False).load(0).digest == first.digest  # no network needed
    assert server.hits["cifar-10-python.tar.gz"] == 1


def test_an_archive_placed_by_hand_is_verified_and_extracted_offline(tmp_path, monkeypatch, keras_home):
    files, _ = cifar10_files(tmp_path)
    publish(monkeypatch, None, "cifar10", files)
    archive = keras_home / "datasets" / "cifar-10-batches-py-target_archive"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(files["cifar-10-python.tar.gz"] + b"junk")
    one_line_error(lambda: Cifar10(download=False).load(0), archive, "does not match", "delete it")
    archive.write_bytes(files["cifar-10-python.tar.gz"])
    assert Cifar10(download=False).load(0).input_shape == (32, 32, 3)


# --- failures: one line naming the URL and the path; nothing left ----------------------------------------

@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_download_that_fails_its_checksum_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, server,
                                                                           keras_home, name):
    cls, make, kept = SETS[name]
    files, _ = make(tmp_path)
    publish(monkeypatch, server, name, files, corrupt=True)
    (url,) = (server.url + f for f in files)
    msg = one_line_error(lambda: cls().load(0), url, keras_home / "datasets" / kept[0], "does not match")
    assert "nothing was kept" in msg
    assert left_behind(keras_home) == []
    assert [p.name for p in (keras_home / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_http_error_is_one_line(tmp_path, monkeypatch, server, keras_home):
    files, _ = mnist_files(tmp_path)
    publish(monkeypatch, None, "mnist", files)  # checksums known, nothing served
    one_line_error(lambda: Mnist().load(0), server.url + "mnist.npz", "HTTP 404", keras_home / "datasets" / "mnist.npz")
    assert left_behind(keras_home) == []


def test_download_false_never_connects_and_says_where_the_file_goes(tmp_path, monkeypatch, server, keras_home):
    files, _ = fashion_files(tmp_path)
    publish(monkeypatch, server, "fashion_mnist", files)
    target = keras_home / "datasets" / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    one_line_error(lambda: FashionMnist(download=False).load(0), "file not found", target,
             server.url + "train-labels-idx1-ubyte.gz", "data.download=true")
    assert not server.hits


def test_offline_cli_is_one_line_exit_2_and_writes_nothing(tmp_path):
    home, mirror = tmp_path / "keras", closed_port_url()
    proc = run_pipeline(["data=mnist"], tmp_path, check=False,
                        env={"KERAS_HOME": str(home), data.MIRROR_ENV: mirror})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: mnist: cannot download {mirror}mnist.npz (")
    assert f"download it by hand to {home / 'datasets' / 'mnist.npz'}" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert left_behind(home) == []


# --- where files are looked for ----------------------------------------------------------------------

def test_keras_home_and_keras_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert data.keras_cache() == [tmp_path / "kh" / "datasets"]
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setattr(data, "KERAS_TMP", tmp_path / "tmp")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert data.keras_cache() == [tmp_path / "tmp" / ".keras" / "datasets"]  # no usable home: as Keras does
    (tmp_path / "user").mkdir()
    assert data.keras_cache() == [tmp_path / "user" / ".keras" / "datasets"]
    # an unwritable Keras home: keras.utils.get_file falls back to /tmp/.keras; we still read the home first
    monkeypatch.setattr(data, "_writable", lambda path: path == tmp_path / "tmp" / ".keras")
    assert data.keras_cache() == [tmp_path / "user" / ".keras" / "datasets", tmp_path / "tmp" / ".keras" / "datasets"]


def test_unwritable_keras_home_downloads_into_the_fallback(tmp_path, monkeypatch, server, keras_home):
    files, _ = mnist_files(tmp_path)
    publish(monkeypatch, server, "mnist", files)
    monkeypatch.setattr(data, "KERAS_TMP", tmp_path / "tmp")
    monkeypatch.setattr(data, "_writable", lambda path: path != keras_home)
    Mnist().load(0)
    assert (tmp_path / "tmp" / ".keras" / "datasets" / "mnist.npz").is_file()
    assert not keras_home.exists()


def test_data_root_is_where_files_are_found_and_downloaded(tmp_path, monkeypatch, server, keras_home):
    files, _ = svhn_files(tmp_path)
    publish(monkeypatch, server, "svhn", files)
    Svhn(root=str(tmp_path / "mine")).load(0)
    assert sorted(p.name for p in (tmp_path / "mine").glob("*.mat")) == ["test_32x32.mat", "train_32x32.mat"]
    assert not keras_home.exists()


def test_a_system_copy_is_used_offline_after_the_cache(tmp_path, monkeypatch, keras_home):
    system = tmp_path / "usr-share-datasets"
    stored = formats.write_fashion(system)  # as Debian's dataset-fashion-mnist lays it out
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": (str(system),)})
    ds = FashionMnist().load(0)  # the mirror is a closed port: no download happened
    np.testing.assert_array_equal(ds.y_test, stored["t10k"][1])
    assert not keras_home.exists()
    formats.write_fashion(keras_home / "datasets")  # a copy in the cache, its test labels shifted: read first
    shifted = np.roll(stored["t10k"][1], 1)
    test_labels = keras_home / "datasets" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    formats.write_idx(test_labels, shifted, label_file=True)
    np.testing.assert_array_equal(FashionMnist().load(0).y_test, shifted)
    np.testing.assert_array_equal(FashionMnist(root=str(tmp_path / "empty")).load(0).y_test, stored["t10k"][1])
    (system / "fashion-mnist" / "train-images-idx3-ubyte.gz").unlink()  # an incomplete copy is not used
    one_line_error(lambda: FashionMnist(root=str(tmp_path / "empty"), download=False).load(0),
             tmp_path / "empty" / "fashion-mnist" / "train-labels-idx1-ubyte.gz", f"nor in {system / 'fashion-mnist'}")


def test_the_debian_package_when_installed():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": ("/usr/share/datasets",)})
        ds = FashionMnist(limit=2000).load(0)
    assert ds.input_shape == (28, 28, 1) and len(ds.x_test) == 10000 and ds.num_classes == 10


# --- concurrency: one download -------------------------------------------------------------------------

def test_two_processes_loading_at_once_download_once(tmp_path, monkeypatch, keras_home):
    slow = Server(delay=1.5)  # the first download is still under way when the second process asks
    try:
        files, _ = mnist_files(tmp_path)
        publish(monkeypatch, slow, "mnist", files)
        checksum = data.REMOTE["mnist"][0].checksum
        code = ("import dataclasses; from pipeline import data; "
                f"data.REMOTE['mnist'] = (dataclasses.replace(data.REMOTE['mnist'][0], checksum={checksum!r}),); "
                "print(data.Mnist().load(0).digest)")
        env = {**os.environ, "KERAS_HOME": str(keras_home), data.MIRROR_ENV: slow.url}
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert len({out for out, _ in outs}) == 1
        assert slow.hits["mnist.npz"] == 1
    finally:
        slow.close()


def test_a_sweep_downloads_in_its_callback_before_any_job(tmp_path):
    """The sweep's callback loads every job's data set before any job starts, so the download happens there,
    once: here the served bytes fail the real checksum, and the sweep stops with one line before launching."""
    s = Server()
    try:
        files, _ = mnist_files(tmp_path)
        s.files = files
        home = tmp_path / "keras"
        args = ["-m", "data=mnist", "sparsity.target=0.3,0.6", "seed=0,1", "training=smoke"]
        proc = run_pipeline(args, tmp_path, check=False, env={"KERAS_HOME": str(home), data.MIRROR_ENV: s.url})
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and s.hits["mnist.npz"] == 1, out[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{s.url}mnist.npz" in errors[0] and "does not match" in errors[0], out
        assert "Launching" not in out and "[job" not in out
        assert not (tmp_path / "mlflow.db").exists() and left_behind(home) == []
    finally:
        s.close()


# --- the table is keras.datasets' own --------------------------------------------------------------------

def test_origins_names_and_checksums_are_those_of_keras_datasets():
    import importlib.util

    src = Path(importlib.util.find_spec("keras").submodule_search_locations[0]) / "src" / "datasets"
    keras_text = {name: (src / f"{name}.py").read_text() for name in ("mnist", "fashion_mnist", "cifar10",
                                                                         "cifar100")}
    for name, text in keras_text.items():
        for remote in data.REMOTE[name]:
            file_name = remote.url.rsplit("/", 1)[1]
            assert file_name in text or remote.url in text, (name, remote.url)
            assert remote.url.startswith(data.KERAS_ORIGIN) or remote.url in text
            algorithm, digest = remote.checksum.split(":")
            if name != "fashion_mnist":  # keras.datasets checks no fashion-mnist checksum: Zalando's MD5s
                assert algorithm == "sha256" and digest in text, name
    assert '"https://storage.googleapis.com/tensorflow/tf-keras-datasets/"' in keras_text["fashion_mnist"]
    assert {r.url.rsplit("/", 1)[1] for r in data.REMOTE["svhn"]} == {"train_32x32.mat", "test_32x32.mat"}
    assert all(r.url.startswith("http://ufldl.stanford.edu/housenumbers/") for r in data.REMOTE["svhn"])


def test_pickled_cifar_batches_stay_refused_after_download(tmp_path, monkeypatch, server):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    monkeypatch.chdir(tmp_path)
    batch = {b"data": formats.images(8, (3072,), 0), b"labels": [0] * 8, b"x": Evil()}
    members = {f"data_batch_{i}": pickle.dumps(batch, protocol=3) for i in range(1, 6)}
    members["test_batch"] = formats.cifar_bytes(formats.cifar_batch(formats.N_TEST, 99))
    publish(monkeypatch, server, "cifar10", {"cifar-10-python.tar.gz": tarball("cifar-10-batches-py", members)})
    one_line_error(lambda: Cifar10().load(0), "refusing to load")
    assert not (tmp_path / "PWNED").exists()
