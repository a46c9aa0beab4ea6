"""Our magnitude pruning on the TF-MOT peer's grid, in-process with Keras 3 (no MLflow).

    .venv/bin/python -m pipeline.peers.ours --out benchmarks/ours.json [--seeds 0 --targets 0.5]

Same models (conf/model), data (conf/data/digits.yaml), budgets (conf/training/default.yaml), seeds and
targets as pipeline.peers.tfmot; the stages and pruning code of the pipeline are called directly.
Per model and seed: one dense baseline, then from it (a) a dense fine-tune with Keras as it comes: its own
optimizer and model.fit (`keras_fit`, one compiled call per batch: the step-time reference), (b) the same
dense fine-tune on the pipeline's fast path (`dense`), (c) one_shot and (d) gradual (conf/sparsity/gradual.yaml)
magnitude pruning as the pipeline fine-tunes (pipeline.stages.finetune: masks held by MaskedModel's constraints
inside every optimizer step, several steps per compiled call; gradual's mask updates inside the compiled loop).
"""

from __future__ import annotations

import sys
import time

from omegaconf import OmegaConf

from pipeline.config import Phase, build
from pipeline.peers import common


def weights_gzip(spec, data, model) -> int:
    """gzip bytes of the model's weights alone. Keras 3's save_weights also writes the optimizer's
    variables of a compiled model (Adam: 2 more copies), which the pipeline's eval/size_gzip_bytes
    includes; TF-MOT's number (tf_keras .h5) holds the weights only, so compare on an uncompiled copy."""
    from pipeline.stages.evaluate import gzip_size

    fresh = spec.build(data.input_shape, data.num_classes)
    fresh.set_weights(model.get_weights())
    return gzip_size(fresh)


def keras_fit(model, data, phase: Phase, seed: int, callbacks) -> None:
    """Keras as it comes, the step-time reference: its own optimizer, model.fit (one compiled call per batch),
    on the batches the pipeline trains on."""
    import keras

    from pipeline.stages.train import training_batches, validation_batches

    optimizer = {"adam": lambda: keras.optimizers.Adam(phase.lr),
                 "sgd": lambda: keras.optimizers.SGD(phase.lr, momentum=phase.momentum)}[phase.optimizer]()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(training_batches(data, phase.batch_size, seed), epochs=phase.epochs, verbose=0, callbacks=callbacks,
              validation_data=validation_batches(data, phase.batch_size))


def main() -> None:
    args = common.parse(__doc__.splitlines()[0], "benchmarks/ours.json")
    import keras
    import tensorflow as tf

    from pipeline.pruning import accounting
    from pipeline.stages.evaluate import gzip_size, test_metrics
    from pipeline.stages.finetune import finetune
    from pipeline.stages.prune import prune
    from pipeline.stages.train import fit, train_baseline

    base_dict, ft_dict = common.phases(args)
    base_phase, ft_phase = Phase(**base_dict), Phase(**ft_dict)
    method = build("method", OmegaConf.load(common.CONF / "method" / "magnitude.yaml"))
    data_source = build("data", OmegaConf.load(common.CONF / "data" / "digits.yaml"))
    gradual_conf = OmegaConf.load(common.CONF / "sparsity" / "gradual.yaml")
    one_shot_conf = OmegaConf.load(common.CONF / "sparsity" / "one_shot.yaml")
    Timer = common.make_step_timer(keras.callbacks.Callback)
    tf.config.experimental.enable_op_determinism()
    meta = common.environment(peer="ours", keras=keras.__version__, tensorflow=tf.__version__,
                              baseline=base_dict, finetune=ft_dict,
                              gradual=OmegaConf.to_container(gradual_conf), argv=sys.argv[1:], complete=False,
                              pruning_scope=f"magnitude scope={method.scope}")
    rows = []
    for name in args.models:
        spec = build("model", OmegaConf.load(common.CONF / "model" / f"{name}.yaml"))
        for seed in args.seeds:
            data = data_source.load(seed)
            keras.utils.set_random_seed(seed)
            model = spec.build(data.input_shape, data.num_classes)
            started = time.perf_counter()
            train_baseline(model, data, base_phase, method)
            base = {"model": name, "seed": seed, "peer": "ours"}
            weights = model.get_weights()
            b = test_metrics(model, data)
            s = accounting.summary(model)
            rows.append({**base, "schedule": "baseline", "target": 0.0, **b, "sparsity": s["sparsity"],
                         "conv_sparsity": s["conv_sparsity"],
                         "size_gzip_bytes": weights_gzip(spec, data, model),
                         "size_gzip_bytes_pipeline": gzip_size(model),
                         "train_s": time.perf_counter() - started})
            print(f"{name} seed {seed}: baseline {b['accuracy']:.4f}", flush=True)
            jobs = [("keras_fit", 0.0), ("dense", 0.0)] + [(s, t) for t in args.targets for s in args.schedules]
            for schedule_name, target in jobs:
                keras.utils.set_random_seed(seed)
                m = spec.build(data.input_shape, data.num_classes)
                m.set_weights(weights)
                timer = Timer()
                started = time.perf_counter()
                if schedule_name == "keras_fit":
                    keras_fit(m, data, ft_phase, seed, [timer])
                elif schedule_name == "dense":
                    fit(m, data, ft_phase, "fine-tuning", [timer])
                else:
                    node = gradual_conf if schedule_name == "gradual" else one_shot_conf
                    schedule = build("sparsity", OmegaConf.merge(node, {"target": target}))
                    masked = prune(m, method, schedule.initial, seed)
                    finetune(masked, data, ft_phase, method, schedule, seed, callbacks=[timer])
                    masked.detach()
                seconds = time.perf_counter() - started
                s = accounting.summary(m)
                r = {**base, "schedule": schedule_name, "target": target, **test_metrics(m, data),
                     "sparsity": s["sparsity"], "conv_sparsity": s["conv_sparsity"],
                     "size_gzip_bytes": weights_gzip(spec, data, m),
                     "size_gzip_bytes_pipeline": gzip_size(m), **timer.summary(), "finetune_s": seconds,
                     "baseline_accuracy": b["accuracy"]}
                rows.append(r)
                common.write(args.out, meta, rows, quiet=True)
                print(f"{name} seed {seed} {schedule_name} {target}: acc {r['accuracy']:.4f} sparsity "
                      f"{r['sparsity']:.3f} step {r['step_ms']:.2f} ms", flush=True)
    meta["complete"] = True
    common.write(args.out, meta, rows)


if __name__ == "__main__":
    main()
