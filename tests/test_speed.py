"""The fast training path (pipeline.stages.loop: an epoch per compiled call, compiled once per process and
structure) gives the results of the plain one (Keras's model.fit, one call per batch)."""

import dataclasses

import keras
import numpy as np
import pytest

from pipeline.config import Phase
from pipeline.models import VGGBN, SeedCNN
from pipeline.pruning.filter import Filter
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.masks import MaskedModel, merge
from pipeline.pruning.schedule import Gradual, OneShot
from pipeline.stages import loop
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune
from pipeline.stages.train import train_baseline

PHASE = Phase(epochs=2, batch_size=64, lr=0.01)


@pytest.fixture(scope="module")
def few(digits):
    return dataclasses.replace(digits, x_train=digits.x_train[:384], y_train=digits.y_train[:384],
                               x_val=digits.x_val[:64], y_val=digits.y_val[:64])


@pytest.fixture(scope="module")
def start(few):
    keras.utils.set_random_seed(0)
    return SeedCNN().build(few.input_shape, few.num_classes).get_weights()


def job(few, start, schedule, fast, method=Magnitude(), build=None):
    """One fine-tuning job from the same start: (history, weights, masks)."""
    keras.utils.set_random_seed(0)
    model = build() if build else SeedCNN().build(few.input_shape, few.num_classes)
    model.set_weights(start)
    masked = prune(model, method, schedule.initial, seed=0)
    history = finetune(masked, few, PHASE, method, schedule, seed=0, fast=fast)
    return history, model.get_weights(), masked.masks


def assert_same(a, b):
    (ha, wa, ma), (hb, wb, mb) = a, b
    assert ha.keys() == hb.keys()
    for key in ha.keys() - {"seconds"}:
        np.testing.assert_allclose(ha[key], hb[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert ma.keys() == mb.keys() and all(np.array_equal(ma[k], mb[k]) for k in ma)


def traces(compiled) -> dict[str, int]:
    """How often each compiled loop of an Engine (or an Evaluator: its outputs) was traced."""
    return {name: getattr(compiled, name).experimental_get_tracing_count()
            for name in ("train_held", "train_stream", "validate_held", "validate_stream", "outputs")
            if hasattr(compiled, name)}


def test_held_batches_are_the_tf_data_pipelines(few):
    """In-memory data is gathered inside the compiled loop by the epoch's shuffled order: epoch after epoch
    the very batches of the tf.data pipeline model.fit reads (same seed), and the validation split in order."""
    import tensorflow as tf

    from pipeline.stages.train import training_batches, validation_batches

    held, stream = loop.Held(*few.held("train"), 48, shuffle_seed=7), training_batches(few, 48, seed=7)
    for _ in range(3):
        held.epoch()
        gathered = [(tf.gather(held.x, held.order[i:i + 48]), tf.gather(held.y, held.order[i:i + 48]))
                    for i in range(0, len(few.y_train), 48)]
        for (x, y), (sx, sy) in zip(gathered, stream, strict=True):
            assert np.array_equal(x, sx) and np.array_equal(y, sy)
    val = loop.Held(*few.held("val"), 48)
    x = tf.concat([x for x, _ in validation_batches(few, 48)], 0)
    assert np.array_equal(x, val.x) and len(val.x) == len(few.y_val)


def test_one_off_pipelines_are_not_autotuned(few):
    """Deleting an autotuned tf.data iterator waits for its tuning thread (up to half a second on a busy
    machine, after every other job of a sweep): the epochs' orders and a first batch have nothing to tune."""
    from pipeline.data import first_batch

    assert loop.Held(*few.held("train"), 48, shuffle_seed=7).shuffles.options().autotune.enabled is False
    x, y = first_batch(few.examples("test"), 5)
    assert np.array_equal(x, few.x_test[:5]) and np.array_equal(y, few.y_test[:5])


def test_augmented_data_streams_and_equals_model_fit(few, start):
    """Augmented (or file) training data goes through tf.data in the compiled loop too, with model.fit's results
    (its validation split, never augmented, stays held)."""
    from pipeline.stages.train import loop_feeds

    augmented = dataclasses.replace(few, crop=1, flip=True)
    assert [type(feed) for feed in loop_feeds(augmented, 32, 0)] == [loop.Stream, loop.Held]
    assert [type(feed) for feed in loop_feeds(few, 32, 0)] == [loop.Held, loop.Held]
    schedule = OneShot(target=0.5)
    assert_same(job(augmented, start, schedule, fast=True), job(augmented, start, schedule, fast=False))


class CompiledCalls(keras.callbacks.Callback):
    """Counts the batch events: one per compiled call on the fast path."""

    calls = 0

    def on_train_batch_end(self, batch, logs=None):
        self.calls += 1


@pytest.mark.parametrize("method, in_graph", [(Magnitude(), True), (Magnitude(scope="layer"), True),
                                              (Filter(), False)])
def test_fast_finetune_equals_model_fit(few, start, method, in_graph):
    """A gradual schedule: magnitude's mask updates run inside the compiled loop (one call per epoch), other
    methods' split the compiled calls at each update; either way model.fit's results, masks included."""
    schedule = Gradual(target=0.6, frequency=3)
    keras.utils.set_random_seed(0)
    model = SeedCNN().build(few.input_shape, few.num_classes)
    model.set_weights(start)
    counter = CompiledCalls()
    finetune(prune(model, method, schedule.initial, seed=0), few, PHASE, method, schedule, seed=0, callbacks=[counter])
    assert (counter.calls == PHASE.epochs) == in_graph
    assert_same(*(job(few, start, schedule, fast, method) for fast in (True, False)))


@pytest.mark.parametrize("method", [Magnitude(), Filter()])
def test_masks_computed_on_a_twin_whose_paths_differ_land_on_the_models_weights(few, tmp_path, method):
    """A Sequential loaded from a file names its weights `conv2d/kernel`; its clone, the compiled loop's twin,
    `sequential/conv2d/kernel`: the schedule's masks, computed on the twin (in the loop for magnitude, at a
    stop for filter), are the plain path's."""
    keras.Sequential([keras.Input(few.input_shape), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                      keras.layers.Dense(few.num_classes, activation="softmax")]).save(tmp_path / "m.keras")

    def build():
        return keras.models.load_model(tmp_path / "m.keras")

    model = build()
    assert [v.path for v in model.variables] != [v.path for v in keras.models.clone_model(model).variables]
    schedule = Gradual(target=0.6, frequency=3)
    start = model.get_weights()
    assert_same(*(job(few, start, schedule, fast, method, build) for fast in (True, False)))


def test_a_second_job_reuses_the_compiled_loop_and_starts_afresh(few, start):
    """The engine of the first job serves the second (no tracing), and the second job's results are what it
    gets alone: weights, masks and optimizer state were reset between them."""
    job(few, start, OneShot(target=0.3), fast=True)
    engines = dict(loop._engines)
    traced = {k: traces(e) for k, e in engines.items()}
    second = job(few, start, OneShot(target=0.7), fast=True)
    assert loop._engines.keys() == engines.keys()
    assert {k: traces(e) for k, e in loop._engines.items()} == traced
    assert_same(second, job(few, start, OneShot(target=0.7), fast=False))


def test_jobs_share_the_compiled_loops_whatever_their_models_were_compiled_with(few, start):
    """A model compiled before (a loaded baseline, a model.evaluate) carries an optimizer named anew in each
    job (rm_sprop_1, rm_sprop_2, ...): neither the training engine nor the test evaluator may depend on it
    (each traced once, whatever the batch sizes), and the evaluator gives what model.evaluate gives, as does
    one made for a single model (a shrunk model's)."""
    from pipeline.stages import evaluate

    traced = []
    for target in (0.3, 0.6):
        model = SeedCNN().build(few.input_shape, few.num_classes)
        model.set_weights(start)
        model.compile(optimizer=keras.optimizers.RMSprop(), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        finetune(prune(model, Magnitude(), target, seed=0), few, PHASE, Magnitude(), OneShot(target), seed=0)
        loss, accuracy = model.evaluate(few.batches("test", 256), verbose=0)
        assert evaluate.test_metrics(model, few) == evaluate.test_metrics(model, few, once=True) == {
            "accuracy": accuracy, "loss": loss}
        traced.append(({k: traces(e) for k, e in loop._engines.items()},
                       {k: traces(e) for k, e in evaluate._evaluators.items()}))
    assert traced[0] == traced[1] and traced[0][1] and all(t == {"outputs": 1} for t in traced[0][1].values())


def test_baseline_fit_equals_model_fit(few):
    """Dense training with a variable regularizer (slimming's L1 on BatchNorm scales) on both paths."""
    from pipeline.pruning.slim import Slim

    results = []
    for fast in (False, True):
        keras.utils.set_random_seed(1)
        model = VGGBN(widths=[4, 8], pool_after=[1], hidden=16).build(few.input_shape, few.num_classes)
        history = train_baseline(model, few, dataclasses.replace(PHASE, epochs=1), Slim(penalty_l1=0.01), fast=fast)
        results.append((history, model.get_weights(), {}))
    assert_same(*results)


def test_pruned_weights_are_zero_after_every_step_of_the_compiled_loop(few):
    """The audit build counts, inside the compiled loop after every optimizer step, the pruned weights
    that are not zero; masks grow every 2 steps (BatchNorm scales and shifts among them); momentum would
    move a pruned weight off zero without the constraint."""
    keras.utils.set_random_seed(0)
    model = VGGBN(widths=[4, 8], pool_after=[1], hidden=16).build(few.input_shape, few.num_classes)
    method = Filter()
    schedule = Gradual(target=0.5, initial_sparsity=0.2, end=0.8, frequency=2)
    masked = MaskedModel(model, merge(method.masks(model, 0.2), Magnitude().masks(model, 0.2)))
    phase = Phase(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9)
    history = finetune(masked, few, phase, method, schedule, seed=0, audit=True)
    assert history["pruned_nonzero"] == [0.0, 0.0]
    assert (~masked.masks["bn1/gamma"]).sum() == 2  # the schedule reached its target: 2 of 4 channels
    eng = loop.engine(model, phase, len(few.x_train) // 32 * 2, audit=True)
    assert int(eng.pruned_nonzero()) == 0
    i = [v.path for v in model.variables].index("bn1/gamma")
    value = eng.twin.variables[i].numpy()
    eng.twin.variables[i].assign(np.where(masked.masks["bn1/gamma"], value, 1.0))  # the counter does count
    assert int(eng.pruned_nonzero()) == 2


def test_keras_loads_without_the_extras_the_pipeline_never_uses():
    """Keras imports scikit-learn and matplotlib when installed (a second of each process's start): hidden while
    it loads (pipeline/__init__.py), both still import afterwards."""
    import subprocess
    import sys

    code = ("import sys, pipeline, keras; print(sorted(m for m in ('sklearn', 'matplotlib', 'scipy.stats') "
            "if m in sys.modules)); import sklearn.datasets, matplotlib.pyplot; print('imported later')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "imported later"]


def test_eval_latency_setting():
    from conftest import compose_config

    from pipeline.config import ConfigError, validate
    from pipeline.stages.evaluate import measures_latency

    assert validate(compose_config())["eval"].latency == "auto"
    with pytest.raises(ConfigError, match="eval.latency='sometimes' is not allowed: auto, always, never"):
        validate(compose_config(["eval.latency=sometimes"]))
    assert [measures_latency(s, structured) for s in ("auto", "always", "never") for structured in (True, False)] \
        == [True, False, True, True, False, False]


JOB_AFTER_OTHERS = """
import sys, hashlib, keras
from pipeline.baseline import seed_everything
from pipeline.config import Phase
from pipeline.data import Digits
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.schedule import OneShot
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune
from pipeline.stages.train import train_baseline

data = Digits(limit=400).load(0)

def job(target):
    seed_everything(0, True)
    model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dropout(0.3),
                              keras.layers.Dense(10, activation="softmax")])
    train_baseline(model, data, Phase(epochs=2, batch_size=32, lr=0.01), Magnitude())
    seed_everything(0, True)
    history = finetune(prune(model, Magnitude(), target, seed=0), data, Phase(epochs=2, batch_size=32, lr=0.01),
                       Magnitude(), OneShot(target), seed=0)
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest(), history["loss"]

for target in sys.argv[1:-1]:
    job(float(target))
print(job(float(sys.argv[-1])))
"""


def test_a_job_after_others_in_one_process_gives_what_it_gives_alone():
    """A sweep's worker runs job after job: reseeding (which keeps TensorFlow's kernel cache, see
    baseline.seed_everything) must leave no random state behind: initialisation, dropout, shuffling."""
    import subprocess
    import sys

    def result(*targets):
        out = subprocess.run([sys.executable, "-c", JOB_AFTER_OTHERS, *targets], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1]

    assert result("0.3", "0.6", "0.5") == result("0.5")
