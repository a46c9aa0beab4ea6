"""Surgery: the physically smaller model computes what the masked model computes."""

import keras
import numpy as np
import pytest

from pipeline.models import VGGBN, ResNet, SeedCNN
from pipeline.pruning import accounting
from pipeline.pruning.filter import Filter
from pipeline.pruning.graph import channel_groups
from pipeline.pruning.masks import MaskedModel
from pipeline.pruning.slim import Slim
from pipeline.pruning.surgery import shrink


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def masked_model(spec, method, target, digits, seed=0):
    """A model with non-trivial BatchNorm statistics and weights, pruned by `method`."""
    keras.utils.set_random_seed(seed)
    model = spec.build(digits.input_shape, digits.num_classes)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    MaskedModel(model, method.masks(model, target, seed)).detach()
    return model


def filters(model) -> dict[str, int]:
    return {layer.name: layer.filters for layer in model.layers if type(layer).__name__ == "Conv2D"}


def check_shrunk(model, digits, tmp_path):
    small, kept = shrink(model)
    assert kept and small is not model
    before, after = filters(model), filters(small)
    assert all(after[n] == kept[n] < before[n] for n in kept if n in before)
    assert sum(after.values()) < sum(before.values())
    assert small.count_params() < model.count_params()
    expected = predict(model, digits.x_test)
    np.testing.assert_allclose(predict(small, digits.x_test), expected, atol=1e-5)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert filters(loaded) == after
    np.testing.assert_allclose(predict(loaded, digits.x_test), expected, atol=1e-5)
    assert accounting.flops(small)[0] < accounting.flops(model)[0]
    return small, kept


@pytest.mark.parametrize("method", [Filter(), Slim()], ids=["filter", "slim"])
def test_shrink_vgg_bn(digits, method, tmp_path):
    model = masked_model(VGGBN(widths=[8, 8, 16], hidden=32), method, 0.5, digits)
    small, kept = check_shrunk(model, digits, tmp_path)
    assert set(kept) == {"conv1", "conv2", "conv3"}  # conv filters only: dense units stay
    if method.name == "filter":
        assert filters(small) == {"conv1": 4, "conv2": 4, "conv3": 8}
    else:
        assert sum(filters(small).values()) == 32 - 16
    # flatten rows of the first dense layer follow the kept channels of the last conv
    assert small.get_layer("dense1").kernel.shape[0] == 4 * 4 * filters(small)["conv3"]


def test_shrink_seed_cnn_one_of_three_filters(digits, tmp_path):
    model = masked_model(SeedCNN(), Filter(), 0.34, digits)
    small, kept = check_shrunk(model, digits, tmp_path)
    assert filters(small) == {f"conv{i}": 2 for i in range(1, 5)}
    assert small.get_layer("dense1").kernel.shape == (8 * 8 * 2, 64)


def test_shrink_resnet_prunes_residual_stages_as_coupled_groups(digits, tmp_path):
    spec = ResNet(blocks=2, width=8)
    model = masked_model(spec, Filter(), 0.5, digits)
    small, kept = check_shrunk(model, digits, tmp_path)
    stages = [g for g in channel_groups(model) if len(g.producers) > 1]
    assert len(stages) == 3  # one group per stage: its first conv (stem or projection) and second convs
    assert {s.layer.name for s in stages[0].producers} == {"stem_conv", "s1b1_2_conv", "s1b2_2_conv"}
    before, after = filters(model), filters(small)
    assert all(after[name] == before[name] // 2 for name in before)  # every conv, the residual ones too
    assert accounting.flops(small)[0] / accounting.flops(model)[0] <= 0.35  # the target at 0.5


def test_shrink_returns_the_model_when_nothing_is_pruned(digits):
    model = SeedCNN().build(digits.input_shape, digits.num_classes)
    small, kept = shrink(model)
    assert small is model and kept == {}



# --- keras.applications with random weights at 32x32 ---------------------------------------------

APPLICATIONS = ["ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0", "VGG16"]


@pytest.fixture(scope="module", params=APPLICATIONS)
def application(request):
    """The application with random weights and BatchNorm statistics, half of every group's channels
    removed at random; logits (no softmax), so that outputs differ wherever a channel is wrongly dropped."""
    from test_graph import prune_half, randomize

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, request.param)(weights=None, input_shape=(32, 32, 3), classes=10,
                                                       classifier_activation=None)
    randomize(model)
    prune_half(model)
    return model


def test_shrink_applications(application, tmp_path):
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    expected = predict(application, x)
    assert np.abs(expected).max() > 1e-2
    small, kept = shrink(application)
    assert kept
    np.testing.assert_allclose(predict(small, x), expected, atol=1e-5)
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras", safe_mode=True)
    np.testing.assert_allclose(predict(loaded, x), expected, atol=1e-5)
    dense, shrunk = accounting.flops(application)[0], accounting.flops(small)[0]
    assert shrunk < 0.5 * dense  # about a quarter: most groups lose half their channels on both sides
    whole = {r["layer"]: r["structured"] for r in accounting.layer_rows(application)
             if r["structured"].startswith("whole")}
    assert whole == {"predictions": "whole: reaches the model output"}  # only the classifier is left whole
