"""Evaluate: test accuracy, sparsity over every denominator, size, FLOPs and measured latency."""

from __future__ import annotations

import collections
import gzip
import json
import statistics
import time

import keras
import numpy as np

from pipeline.pruning import accounting
from pipeline.pruning.masks import assign_all
from pipeline.stages.loop import Held, Stream, cached, in_order, structure, test_loops


class Evaluator:
    """A compiled twin of one model structure: the test loss and accuracy of any model of that structure,
    its weights copied in (what model.evaluate computes, without tracing a test function per model)."""

    def __init__(self, model):
        self.twin = keras.models.clone_model(model)
        self.twin.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        self.validate_stream, self.validate_held = test_loops(self.twin)  # what a feed's validate() calls

    def __call__(self, model, feed: Held | Stream) -> dict[str, float]:
        assign_all(self.twin.variables, model.variables)
        self.twin.reset_metrics()
        return {k: float(v) for k, v in feed.validate(self).items()}


_evaluators: collections.OrderedDict = collections.OrderedDict()


def test_metrics(model, data, split: str = "test") -> dict[str, float]:
    """Accuracy and loss on the test split (or `split`), by an Evaluator kept per model structure (the jobs
    of a sweep share one)."""
    key = json.dumps([structure(model), keras.mixed_precision.global_policy().name])
    out = cached(_evaluators, key, lambda: Evaluator(model))(model, in_order(data, split, 256))
    return {"accuracy": out["accuracy"], "loss": out["loss"]}


def gzip_size(model) -> int:
    """Bytes of the model's weights (no optimizer state), concatenated raw and gzipped (level 9).
    The same weights give the same bytes anywhere, so pipeline.verify can recompute it (an .npz is not
    byte-stable: its zip entries differ between users of one machine)."""
    raw = b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())
    return len(gzip.compress(raw, compresslevel=9, mtime=0))


def weight_metrics(model, small_model=None) -> dict[str, float]:
    """The eval/ metrics the weights alone determine: accounting.summary of the masked `model`, the
    gzipped size of the final model and, with a shrunk `small_model`, its FLOPs and parameters."""
    out = accounting.summary(model)
    out["size_gzip_bytes"] = gzip_size(small_model if small_model is not None else model)
    if small_model is not None:
        out["flops_shrunk"] = accounting.flops(small_model)[0]
        out["params_shrunk"] = small_model.count_params()
    return out


def compiled_forward(model, image_shape: tuple[int, ...]):
    """The model's forward pass (inference), compiled once for batches of any size."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *image_shape], "float32")
    return tf.function(lambda batch: model(batch, training=False), input_signature=[spec])


def paired_latency_ms(forwards: list, x: np.ndarray, repeats: int) -> list[float]:
    """Median wall time of each compiled forward pass on the batch `x`, timed in turn (A, B, A, B, ...) so
    that every model sees the same machine load: timing one model after the other lets a change in
    load (a shared machine) turn into a false speed-up or slow-down."""
    import tensorflow as tf

    batch = tf.constant(x)
    for forward in forwards:
        for _ in range(3):
            forward(batch)
    times = [[] for _ in forwards]
    for _ in range(repeats):
        for forward, series in zip(forwards, times):
            start = time.perf_counter()
            forward(batch).numpy()
            series.append((time.perf_counter() - start) * 1000)
    return [statistics.median(series) for series in times]


LATENCY_REPEATS = {1: 30, 256: 10}  # timed forward passes per model (a median of each)


def measures_latency(setting: str, structured: bool) -> bool:
    """eval.latency: `auto` times only a physically shrunk model (a masked model runs the dense model's
    arithmetic, so its latency says nothing new), `always` every job, `never` none."""
    return setting == "always" or (setting == "auto" and structured)


def evaluate(model, data, dense_model=None, small_model=None, latency: str = "auto") -> dict[str, float]:
    """The eval/ metrics: `model` is the masked model; `small_model` its shrunk form, if any.
    `accuracy` and `loss` are the final model's (the shrunk one where it exists), `masked_accuracy`
    the masked model's, so that each logged model's accuracy can be checked. Latency of `dense_model`
    against the final model as eval.latency says (see measures_latency)."""
    final = small_model if small_model is not None else model
    out = test_metrics(final, data)
    out["masked_accuracy"] = test_metrics(model, data)["accuracy"] if small_model is not None else out["accuracy"]
    out.update(weight_metrics(model, small_model))
    if dense_model is not None and measures_latency(latency, small_model is not None):
        x = data.sample(max(LATENCY_REPEATS)).astype("float32")
        forwards = [compiled_forward(m, x.shape[1:]) for m in (dense_model, final)]
        for batch, repeats in LATENCY_REPEATS.items():
            suffix = "" if batch == 1 else f"_b{batch}"
            dense_ms, pruned_ms = paired_latency_ms(forwards, x[:batch], repeats)
            out[f"latency_ms_dense{suffix}"], out[f"latency_ms_pruned{suffix}"] = dense_ms, pruned_ms
        out["speedup_measured"] = out["latency_ms_dense_b256"] / out["latency_ms_pruned_b256"]
    return out
