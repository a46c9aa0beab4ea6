"""method=nm: N:M semi-structured sparsity (2:4 by default) along each kernel's reduction axis."""

import numpy as np
import pytest
from conftest import compose_config, run_in_process

from pipeline.config import ConfigError, validate
from pipeline.pruning.nm import NM, SPATIAL, kernels, nm_mask

M = 4


def groups(w, axis, m=M):
    """The kernel as rows of its reduction axis, zero-padded to a multiple of m, cut in groups of m."""
    if axis == SPATIAL:
        rows = w.reshape(-1, w.shape[-2] * w.shape[-1]).T
    else:
        moved = np.moveaxis(w, axis, -1)
        rows = moved.reshape(-1, moved.shape[-1])
    return np.pad(rows, ((0, 0), (0, -rows.shape[1] % m))).reshape(len(rows), -1, m)


@pytest.fixture(scope="module")
def every_kind():
    """One layer of each kernel kind, random weights, reduction lengths that are and are not multiples of 4."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 8), name="image")
    x = layers.Conv2D(12, 3, padding="same", name="conv")(inputs)  # reduction 8 (two groups)
    x = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)  # 3x3 = 9 positions: 4 + 4 + 1
    x = layers.SeparableConv2D(6, 3, padding="same", name="separable")(x)  # pointwise reduction 12
    x = layers.Conv2DTranspose(5, 3, name="transposed")(x)  # kernel (3, 3, 5, 6): reduction 6 = 4 + 2
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, activation="softmax", name="classifier")(x)  # reduction 5 = 4 + 1
    return keras.Model(inputs, outputs)


def test_every_group_of_m_keeps_at_most_n_and_short_groups_keep_min_length_n(every_kind):
    masks = NM().masks(every_kind, 0.5)
    found = {var.path: (var.numpy(), axis) for var, axis in kernels(every_kind)}
    assert set(masks) == set(found)
    assert {p.split("/")[0] for p in masks} >= {"conv", "classifier"}  # the kinds the graph lists as prunable
    for path, (w, axis) in found.items():
        kept = groups(masks[path].astype(int), axis)
        length = (kept.shape[1] - 1) * M + (groups(np.ones_like(w), axis)[0, -1] > 0).sum()
        assert (kept[:, :-1].sum(-1) == 2).all(), path  # whole groups: exactly n
        assert (kept[:, -1].sum(-1) == min(2, length - (kept.shape[1] - 1) * M)).all(), path  # short: min(r, n)
        # the kept weights are the largest of their group
        mags, keep = groups(np.abs(w), axis), groups(masks[path], axis).astype(bool)
        smallest_kept = np.where(keep, mags, np.inf).min(-1)
        largest_dropped = np.where(keep | (groups(np.ones_like(w), axis) == 0), -np.inf, mags).max(-1)
        assert (smallest_kept >= largest_dropped).all(), path


def test_the_reduction_axis_of_each_kind():
    w = np.arange(2 * 8, dtype=float).reshape(2, 8)  # Dense (in=2... ) as a conv-like (8 inputs) on axis -1
    assert nm_mask(w, -1, 2, 4).tolist() == [[False, False, True, True] * 2] * 2
    dense = np.array([[1.0], [4.0], [2.0], [3.0], [9.0]])  # Dense kernel (5 inputs, 1 unit): groups [1,4,2,3], [9]
    assert nm_mask(dense, -2, 2, 4)[:, 0].tolist() == [False, True, False, True, True]
    depthwise = np.arange(9, dtype=float).reshape(3, 3, 1, 1)  # positions 0..8: keep 2, 3 | 6, 7 | 8
    assert np.flatnonzero(nm_mask(depthwise, SPATIAL, 2, 4)).tolist() == [2, 3, 6, 7, 8]


def test_a_rate_on_the_way_prunes_floor_t_m_per_group(every_kind):
    nm = NM()
    sizes = {p: m.size for p, m in nm.masks(every_kind, 0.5).items()}
    ramp = [sum(int((~m).sum()) for m in nm.masks(every_kind, t).values()) for t in (0.0, 0.25, 0.5, 0.9)]
    assert ramp[0] == 0 and 0 < ramp[1] < ramp[2] == ramp[3] and ramp[2] <= sum(sizes.values()) // 2


@pytest.mark.parametrize("overrides, needle", [
    (["method=nm", "sparsity.target=0.3"], "sparsity.target=0.3"),
    (["method=nm", "method.n=1", "method.m=4"], "sparsity.target=0.75"),
    (["method=nm", "method.n=4"], "method.n=4"),
])
def test_the_target_is_fixed_by_n_and_m(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert validate(compose_config(["method=nm", "method.n=1", "method.m=4", "sparsity.target=0.75"]))["method"].n == 1
    assert validate(compose_config(["method=nm", "sparsity=gradual"]))["method"].m == 4


def test_a_job_keeps_the_pattern_through_fine_tuning_and_verifies(tmp_path):
    """A whole job (prune, fine-tune with the masks in every step, evaluate, log) on vgg_bn, then the logged
    model holds 2:4 in every kernel, and pipeline.verify re-derives the masks and accepts the run."""
    import keras

    from pipeline import tracking
    from pipeline.verify import verify

    result = run_in_process(tmp_path, ["method=nm", "model=vgg_bn", "model.widths=[8,8]", "model.hidden=16",
                                       "training=smoke", "training.finetune.epochs=2"])
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/sparsity"] == pytest.approx(0.5, abs=0.02)
    model = keras.saving.load_model(client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path)))
    for var, axis in kernels(model):
        nonzero = groups((var.numpy() != 0).astype(int), axis).sum(-1)
        assert nonzero.max() <= 2, var.path
    assert verify(client, run.info.run_id) == []
