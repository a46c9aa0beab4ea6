"""The TF peer: tensorflow-model-optimization's magnitude pruning on our models, data and budgets.

Run with the peer venv only (tf_keras + tensorflow-model-optimization; `make bench` creates it):

    .venv-peers/bin/python -m pipeline.peers.tfmot --out benchmarks/peer.json [--seeds 0 --targets 0.5]
        [--data fashion_mnist --data-limit 2000 --test-limit 1000]

TF-MOT works only with tf_keras (Keras 2) and switches the process to it on import, so this module
imports nothing of the pipeline that imports Keras 3: only pipeline.data (numpy, scikit-learn) and
pipeline.peers.common. The models are rebuilt here in tf_keras with the layers of pipeline/models.py
(sizes read from conf/model/*.yaml); budgets come from conf/training/default.yaml and the ramp of the
gradual schedule from conf/sparsity/gradual.yaml. --data names conf/data/<name>.yaml (digits by default);
--data-limit keeps the first N training examples (data.limit), --test-limit the first N test examples;
--baseline-lr overrides the baseline's learning rate.

Per model and seed: one dense baseline, then from it (a) a dense fine-tune (the step-time reference in
this process), (b) one_shot = ConstantSparsity(target, begin_step=0), (c) gradual =
PolynomialDecay(initial -> target over the same steps as our Gradual), both with UpdatePruningStep.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras -> tf_keras, as TF-MOT expects

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from pipeline import data as datasets  # noqa: E402
from pipeline.peers import common  # noqa: E402


def data_options() -> argparse.Namespace:
    """--data, --data-limit, --test-limit, --baseline-lr, taken out of sys.argv before common.parse reads the rest."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default="digits", help="conf/data/<name>.yaml")
    p.add_argument("--data-limit", type=int, default=None, help="data.limit: the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="score on the first N test examples")
    p.add_argument("--baseline-lr", type=float, default=None, help="override the baseline's learning rate")
    options, sys.argv[1:] = p.parse_known_args()
    return options


def data_source(options: argparse.Namespace) -> datasets.DataSource:
    """The pipeline's data class named by conf/data/<name>.yaml's _target_, with its options."""
    node = common.conf("data", options.data)
    cls = getattr(datasets, node.pop("_target_").rsplit(".", 1)[1])
    if options.data_limit:
        node["limit"] = options.data_limit
    return cls(**node)


def load(source: datasets.DataSource, seed: int, test_limit: int | None) -> datasets.Dataset:
    data = source.load(seed)
    if test_limit:
        data = dataclasses.replace(data, x_test=data.x_test[:test_limit], y_test=data.y_test[:test_limit])
    return data


def build(name: str, input_shape, num_classes: int, keras):
    """seed_cnn and vgg_bn exactly as pipeline/models.py builds them, in tf_keras."""
    spec = common.conf("model", name)
    layers = keras.layers
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if name == "seed_cnn":
        for i in range(1, spec["conv_layers"] + 1):
            x = layers.Conv2D(spec["filters"], spec["kernel_size"], padding=spec["padding"],
                              activation="relu", name=f"conv{i}")(x)
    elif name == "vgg_bn":
        for i, width in enumerate(spec["widths"], start=1):
            x = layers.Conv2D(width, 3, padding=spec["padding"], use_bias=False, name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU(name=f"relu{i}")(x)
            if i in spec["pool_after"]:
                x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    else:
        raise SystemExit(f"error: model {name!r} is not rebuilt for the peer (seed_cnn or vgg_bn)")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(spec["hidden"], activation="relu", name="dense1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def optimizer(phase: dict, keras):
    wd = phase["weight_decay"] or None
    if phase["optimizer"] == "sgd":
        return keras.optimizers.SGD(phase["lr"], momentum=phase["momentum"], weight_decay=wd)
    return keras.optimizers.Adam(phase["lr"], weight_decay=wd)


def fit(model, data, phase, keras, callbacks=()):
    model.compile(optimizer=optimizer(phase, keras), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, batch_size=phase["batch_size"], epochs=phase["epochs"],
              validation_data=(data.x_val, data.y_val), shuffle=True, verbose=0, callbacks=list(callbacks))


def kernel_sparsity(model) -> dict[str, float]:
    kinds = ("Conv2D", "Dense")
    kernels = [(type(layer).__name__, layer.kernel.numpy()) for layer in model.layers
               if type(layer).__name__ in kinds]
    total = sum(k.size for _, k in kernels)
    conv = [k for kind, k in kernels if kind == "Conv2D"]
    conv_total = sum(k.size for k in conv)
    return {"sparsity": 1 - sum(np.count_nonzero(k) for _, k in kernels) / total,
            "conv_sparsity": 1 - sum(np.count_nonzero(k) for k in conv) / conv_total}


def test_metrics(model, data) -> dict[str, float]:
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    loss, acc = model.evaluate(data.x_test, data.y_test, batch_size=256, verbose=0)
    return {"accuracy": float(acc), "loss": float(loss)}


def gzip_size(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        model.save_weights(path)
        return common.gzip_bytes(path)


def main() -> None:
    options = data_options()
    args = common.parse(__doc__.splitlines()[0], "benchmarks/peer.json")
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sp = tfmot.sparsity.keras
    base_phase, ft_phase = common.phases(args)
    if options.baseline_lr:
        base_phase["lr"] = options.baseline_lr
    ramp = common.gradual()
    source = data_source(options)
    Timer = common.make_step_timer(keras.callbacks.Callback)
    tf.config.experimental.enable_op_determinism()
    meta = common.environment(peer="tensorflow-model-optimization", tfmot=tfmot.__version__,
                              tf_keras=keras.__version__, tensorflow=tf.__version__, baseline=base_phase,
                              finetune=ft_phase, gradual=ramp, argv=sys.argv[1:], complete=False,
                              data=options.data, data_limit=options.data_limit, test_limit=options.test_limit,
                              pruning_scope="per layer (TF-MOT prunes each kernel to the target)")
    rows = []
    for name in args.models:
        for seed in args.seeds:
            data = load(source, seed, options.test_limit)
            keras.utils.set_random_seed(seed)
            model = build(name, data.input_shape, data.num_classes, keras)
            started = time.perf_counter()
            fit(model, data, base_phase, keras)
            base = {"model": name, "seed": seed, "peer": "tfmot"}
            weights = model.get_weights()
            b = test_metrics(model, data)
            rows.append({**base, "schedule": "baseline", "target": 0.0, **b, **kernel_sparsity(model),
                         "size_gzip_bytes": gzip_size(model), "train_s": time.perf_counter() - started})
            print(f"{name} seed {seed}: baseline {b['accuracy']:.4f}", flush=True)
            steps = int(np.ceil(len(data.x_train) / ft_phase["batch_size"])) * ft_phase["epochs"]
            begin, end = common.ramp_steps(steps, ramp)
            jobs = [("dense", 0.0)] + [(s, t) for t in args.targets for s in args.schedules]
            for schedule, target in jobs:
                keras.utils.set_random_seed(seed)
                m = build(name, data.input_shape, data.num_classes, keras)
                m.set_weights(weights)
                timer = Timer()
                callbacks = [timer]
                if schedule == "one_shot":
                    m = sp.prune_low_magnitude(m, pruning_schedule=sp.ConstantSparsity(
                        target, begin_step=0, frequency=ramp["frequency"]))
                    callbacks = [sp.UpdatePruningStep(), timer]
                elif schedule == "gradual":
                    m = sp.prune_low_magnitude(m, pruning_schedule=sp.PolynomialDecay(
                        ramp["initial_sparsity"], target, begin_step=begin, end_step=end, power=3,
                        frequency=ramp["frequency"]))
                    callbacks = [sp.UpdatePruningStep(), timer]
                started = time.perf_counter()
                fit(m, data, ft_phase, keras, callbacks)
                seconds = time.perf_counter() - started
                final = sp.strip_pruning(m) if schedule != "dense" else m
                r = {**base, "schedule": schedule, "target": target, **test_metrics(final, data),
                     **kernel_sparsity(final), "size_gzip_bytes": gzip_size(final), **timer.summary(),
                     "finetune_s": seconds, "baseline_accuracy": b["accuracy"]}
                rows.append(r)
                common.write(args.out, meta, rows, quiet=True)
                print(f"{name} seed {seed} {schedule} {target}: acc {r['accuracy']:.4f} sparsity "
                      f"{r['sparsity']:.3f} step {r['step_ms']:.2f} ms", flush=True)
    meta["complete"] = True
    common.write(args.out, meta, rows)


if __name__ == "__main__":
    main()
