"""data=folder: your own images, one subfolder per class, decoded from real PNG files as they are read."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, run_pipeline

from pipeline.config import Phase
from pipeline.data import DataError, Folder
from pipeline.stages import train
from pipeline.verify import verify

CLASSES = ("ant", "bee", "cat")


def write_png(path, seed, shape=(12, 10, 3)):
    """A random RGB image (12x10: resized on loading) as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path.write_bytes(tf.io.encode_png(image).numpy())
    return image


def write_tree(root, per_class=12, start=0, shape=(12, 10, 3)):
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            write_png(root / name / f"{i:02d}.png", seed=start + 100 * k + i, shape=shape)
    return root


def folder(root, **options):
    return Folder(path=str(root), **{"image_size": [8, 8], "channels": 1, **options})


def pixels(data, split):
    """The split's images and labels as the pipeline streams them."""
    pairs = [(x.numpy(), y.numpy()) for x, y in data.examples(split)]
    return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs])


def total(data):
    return sum(data.sizes.values())


def test_one_tree_is_split_per_file_and_classes_are_sorted_names(tmp_path):
    data = folder(write_tree(tmp_path / "imgs")).load(0)
    assert data.class_names == list(CLASSES) and data.num_classes == 3
    x_train, y_train = pixels(data, "train")
    assert data.input_shape == (8, 8, 1) == x_train.shape[1:] and x_train.dtype == np.float32
    assert 0 <= x_train.min() and x_train.max() <= 1
    np.testing.assert_array_equal(y_train, data.y_train)
    assert total(data) == 36 and 0 < data.sizes["test"] < 18
    assert data.source == str((tmp_path / "imgs").resolve()) and data.warnings == []
    assert data.name == "imgs"  # the MLflow Dataset input is named after the folder
    other_seed = folder(tmp_path / "imgs").load(1)
    assert other_seed.files_test == data.files_test  # the test split is the files', not the seed's
    np.testing.assert_array_equal(pixels(other_seed, "test")[0], pixels(data, "test")[0])
    assert sorted(other_seed.files_val) != sorted(data.files_val)  # validation is the seed's
    assert other_seed.digest == data.digest


def test_train_and_test_folders_stream_the_files_pixels(tmp_path):
    write_tree(tmp_path / "imgs" / "train", per_class=6)
    stored = {f"{name}/{i}.png": write_png(tmp_path / "imgs" / "test" / name / f"{i}.png", 50 + 10 * k + i, (6, 5, 3))
              for k, name in enumerate(CLASSES) for i in range(2)}
    data = folder(tmp_path / "imgs", channels=3, image_size=[6, 5]).load(0)
    assert data.sizes["test"] == 6 and data.sizes["train"] + data.sizes["val"] == 18
    assert data.input_shape == (6, 5, 3) and data.class_names == list(CLASSES)
    assert sorted(data.y_test.tolist()) == [0, 0, 1, 1, 2, 2]
    x_test, _ = pixels(data, "test")  # stored at image_size: not resized, only scaled
    expected = [stored["/".join(f.split("/")[-2:])] / np.float32(255) for f in data.files_test]
    np.testing.assert_array_equal(x_test, np.stack(expected).astype(np.float32))
    np.testing.assert_array_equal(data.sample(8), np.concatenate([x_test, x_test[:2]]))


def test_the_same_images_give_the_same_digest(tmp_path):
    first = folder(write_tree(tmp_path / "a")).load(0).digest
    assert folder(write_tree(tmp_path / "b")).load(0).digest == first  # content, not path
    (tmp_path / "b" / "ant" / "00.png").rename(tmp_path / "b" / "bee" / "99.png")
    assert folder(tmp_path / "b").load(0).digest != first  # labels count
    write_png(tmp_path / "a" / "ant" / "00.png", seed=999)
    assert folder(tmp_path / "a").load(0).digest != first


def test_a_folder_data_set_holds_no_image_in_memory(tmp_path):
    """Streaming: only file names and labels are kept, and reading every split in a fresh process peaks far below
    the images' size as float32 (which decoding them into arrays, as before, needed several times over)."""
    n, side = 900, 128  # 900 x 128 x 128 x 3 float32: 169 MB decoded
    png = tf.io.encode_png(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).numpy()
    for i in range(n):
        (tmp_path / "big" / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "big" / CLASSES[i % 3] / f"{i}.png").write_bytes(png)
    write_tree(tmp_path / "warm", per_class=6)
    script = textwrap.dedent(f"""
        import json, resource, numpy as np
        from pipeline.data import Folder
        from pipeline.stages import train

        def read_all(path):
            data = Folder(path=path, image_size=[{side}, {side}], channels=3, normalize=True, augment=True).load(0)
            held = [k for k, v in vars(data).items() if isinstance(v, np.ndarray) and v.ndim > 1]
            seen = sum(len(y) for y in train.training_batches(data, 8, 0).map(lambda x, y: y))
            seen += sum(len(y) for split in ("val", "test") for y in data.batches(split, 8).map(lambda x, y: y))
            return seen, held, data.sample(4).shape
        read_all({str(tmp_path / "warm")!r})  # TensorFlow's one-time allocations, before the measure
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seen, held, sample = read_all({str(tmp_path / "big")!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"seen": seen, "held": held, "peak_mb": peak / 1024, "sample": sample}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    decoded_mb = n * side * side * 3 * 4 / 2**20
    assert out["seen"] == n and out["held"] == [] and out["sample"] == [4, side, side, 3]
    assert out["peak_mb"] < decoded_mb / 4, out


def test_normalize_uses_the_streamed_training_split(tmp_path):
    raw = folder(write_tree(tmp_path / "imgs"), channels=3).load(0)
    norm = folder(tmp_path / "imgs", channels=3, normalize=True).load(0)
    x, _ = pixels(raw, "train")
    mean, std = (np.asarray(norm.normalization[k]) for k in ("mean", "std"))
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2), dtype=np.float64), rtol=1e-5)
    for split in ("train", "test"):
        np.testing.assert_allclose(pixels(norm, split)[0], (pixels(raw, split)[0] - mean) / std, atol=1e-5)
    assert folder(tmp_path / "imgs", channels=3, normalize=True).load(0).normalization == norm.normalization
    assert norm.digest == raw.digest


def test_augmented_training_batches_are_seeded(tmp_path):
    data = folder(write_tree(tmp_path / "imgs", per_class=4), channels=3, augment=True).load(0)
    assert (data.crop, data.flip) == (4, True)

    def epoch():
        return np.concatenate([x.numpy() for x, _ in train.training_batches(data, 4, seed=5)])
    once = epoch()
    assert once.shape == (data.sizes["train"], 8, 8, 3)
    np.testing.assert_array_equal(once, epoch())
    assert train.steps_per_epoch(data, Phase(batch_size=4)) == -(-data.sizes["train"] // 4)


def test_limit_samples_training_images_across_classes(tmp_path):
    data = folder(write_tree(tmp_path / "imgs"), limit=12, val_fraction=0.25).load(0)
    assert data.sizes["train"] + data.sizes["val"] == 12 and set(data.y_train) == {0, 1, 2}
    assert data.sizes["test"] == folder(tmp_path / "imgs").load(0).sizes["test"]


def test_a_test_class_unknown_to_training_is_an_error(tmp_path):
    write_tree(tmp_path / "imgs" / "train", per_class=4)
    write_tree(tmp_path / "imgs" / "test", per_class=1)
    write_png(tmp_path / "imgs" / "test" / "dog" / "0.png", seed=1)
    with pytest.raises(DataError, match="test class folder.*dog"):
        folder(tmp_path / "imgs").load(0)


@pytest.mark.parametrize("make, match", [
    (lambda root: None, "not a folder"),
    (lambda root: (root / "train" / "ant").mkdir(parents=True), "has train/ but no test/"),
    (lambda root: (root / "ant").mkdir(parents=True), "class folder .*ant holds no image"),
    (lambda root: root.mkdir(), "no class folders"),
])
def test_layout_mistakes_are_one_line(tmp_path, make, match):
    make(tmp_path / "imgs")
    with pytest.raises(DataError, match=match):
        folder(tmp_path / "imgs").load(0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="channels"):
        Folder(path="/x", channels=2)
    with pytest.raises(ValueError, match="image_size"):
        Folder(path="/x", image_size=[0, 8])


def test_corrupt_images_are_one_error_or_skipped_and_counted_with_skip_bad(tmp_path):
    root = write_tree(tmp_path / "imgs")
    bad = [root / "bee" / "05.png", root / "cat" / "11.png"]
    bad[0].write_bytes(b"not an image")
    bad[1].write_bytes((root / "cat" / "10.png").read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=f"cannot decode {bad[0]} as an image \\(Unknown image file format"):
        folder(root).load(0)
    data = folder(root, skip_bad=True).load(0)
    assert total(data) == 34
    assert not set(map(str, bad)) & {*data.files_train, *data.files_val, *data.files_test}
    assert len(data.warnings) == 1 and "skipped 2 of 36" in data.warnings[0]
    assert all(str(b) in data.warnings[0] for b in bad)
    assert pixels(data, "train")[0].shape == (data.sizes["train"], 8, 8, 1)  # nothing bad left to stream


def test_a_class_left_without_training_images_by_skip_bad_is_an_error(tmp_path):
    write_tree(tmp_path / "imgs" / "train", per_class=3)
    write_tree(tmp_path / "imgs" / "test", per_class=1, start=50)
    for f in (tmp_path / "imgs" / "train" / "bee").iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataError, match="class folder\\(s\\) bee have no training image left after data.skip_bad"):
        folder(tmp_path / "imgs", skip_bad=True).load(0)


def cli(tmp_path, root, *options):
    return run_pipeline(["data=folder", f"data.path={root}", "data.image_size=[8,8]", "data.channels=1",
                         "training=smoke", *options], tmp_path, check=False)


def test_cli_corrupt_image_exits_2_naming_it_and_tracks_nothing(tmp_path):
    bad = write_tree(tmp_path / "imgs") / "cat" / "03.png"
    bad.write_bytes(b"\x89PNG truncated")
    proc = cli(tmp_path, tmp_path / "imgs")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: folder: cannot decode") and str(bad) in lines[0], \
        proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_cli_a_folder_of_pngs_trains_and_prunes_skipping_a_bad_one(tmp_path, client_for):
    (write_tree(tmp_path / "imgs") / "cat" / "03.png").write_bytes(b"garbage")
    proc = cli(tmp_path, tmp_path / "imgs", "data.skip_bad=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id],
                              "tags.method = 'magnitude'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    job = runs[0]
    assert "skipped 1 of 36" in job.data.tags["data_warnings"] and "03.png" in job.data.tags["data_warnings"]
    assert "eval/accuracy" in job.data.metrics and job.data.metrics["eval/sparsity"] > 0.3
    (dataset_input,) = job.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest) == ("imgs", job.data.tags["data_digest"])
    assert json.loads(dataset.source)["uri"] == str((tmp_path / "imgs").resolve())
    profile = json.loads(dataset.profile)
    assert profile["class_names"] == list(CLASSES) and profile["image_shape"] == [8, 8, 1]
    assert profile["train"] + profile["validation"] + profile["test"] == 35
    assert verify(client, job.info.run_id, tag=False, report=lambda line: None) == []  # streamed test data again
    changed = folder(tmp_path / "imgs", skip_bad=True).load(0).files_train[0]  # training: test accuracy holds
    write_png(Path(changed), seed=999)
    (problem,) = verify(client, job.info.run_id, tag=False, report=lambda line: None)
    assert problem.startswith("data: the data rebuilt from config.yaml has digest") and "changed" in problem
