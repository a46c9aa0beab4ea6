"""data=folder: your own images, one subfolder per class, decoded from real PNG files."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_pipeline

from pipeline.data import DataError, Folder

CLASSES = ("ant", "bee", "cat")


def write_png(path, seed, shape=(12, 10, 3)):
    """A random RGB image (12x10: resized on loading) as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path.write_bytes(tf.io.encode_png(image).numpy())


def write_tree(root, per_class=12, start=0):
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            write_png(root / name / f"{i:02d}.png", seed=start + 100 * k + i)
    return root


def folder(root, **options):
    return Folder(path=str(root), **{"image_size": [8, 8], "channels": 1, **options})


def test_one_tree_is_split_per_file_and_classes_are_sorted_names(tmp_path):
    data = folder(write_tree(tmp_path / "imgs")).load(0)
    assert data.class_names == list(CLASSES) and data.num_classes == 3
    assert data.input_shape == (8, 8, 1) and data.x_train.dtype == np.float32
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    total = len(data.x_train) + len(data.x_val) + len(data.x_test)
    assert total == 36 and 0 < len(data.x_test) < 18
    assert data.source == str((tmp_path / "imgs").resolve()) and data.warnings == []
    other_seed = folder(tmp_path / "imgs").load(1)
    np.testing.assert_array_equal(other_seed.x_test, data.x_test)  # the test split is the files', not the seed's
    assert other_seed.digest == data.digest


def test_train_and_test_folders(tmp_path):
    write_tree(tmp_path / "imgs" / "train", per_class=6)
    write_tree(tmp_path / "imgs" / "test", per_class=2, start=50)
    data = folder(tmp_path / "imgs", channels=3, image_size=[6, 5]).load(0)
    assert len(data.x_test) == 6 and len(data.x_train) + len(data.x_val) == 18
    assert data.input_shape == (6, 5, 3) and data.class_names == list(CLASSES)
    assert sorted(data.y_test.tolist()) == [0, 0, 1, 1, 2, 2]


def test_the_same_images_give_the_same_digest(tmp_path):
    first = folder(write_tree(tmp_path / "a")).load(0).digest
    assert folder(write_tree(tmp_path / "b")).load(0).digest == first  # content, not path
    write_png(tmp_path / "b" / "ant" / "00.png", seed=999)
    assert folder(tmp_path / "b").load(0).digest != first


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


def test_corrupt_image_skipped_with_skip_bad(tmp_path):
    bad = write_tree(tmp_path / "imgs") / "bee" / "05.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot decode {bad}"):
        folder(tmp_path / "imgs").load(0)
    data = folder(tmp_path / "imgs", skip_bad=True).load(0)
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 35
    assert len(data.warnings) == 1 and "skipped 1 of 36" in data.warnings[0] and str(bad) in data.warnings[0]


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


def test_cli_skip_bad_trains_and_prunes_with_a_warning_tag(tmp_path, client_for):
    (write_tree(tmp_path / "imgs") / "cat" / "03.png").write_bytes(b"garbage")
    proc = cli(tmp_path, tmp_path / "imgs", "data.skip_bad=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id],
                              "tags.method = 'magnitude'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "skipped 1 of 36" in runs[0].data.tags["data_warnings"]
    assert "eval/accuracy" in runs[0].data.metrics
