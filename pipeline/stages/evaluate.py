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
from pipeline.stages.loop import cached, structure


class Evaluator:
    """Test loss and accuracy of a model (what model.evaluate computes, Keras's loss from the softmax's logits)
    and its timed forward pass, from one compiled forward pass over `twin`, traced once. Kept per model
    structure with a twin that each model's weights are copied into (the jobs of a sweep share one), or made
    on the model itself for one evaluated once (a shrunk model): tracing Keras's test step and metrics took
    six times as long."""

    def __init__(self, twin):
        import tensorflow as tf

        self.twin = twin

        @tf.function(input_signature=[tf.TensorSpec([None, *twin.input_shape[1:]], "float32")])
        def outputs(x):
            """The probabilities, and the logits that Keras's loss reads from a softmax in a graph (read at
            the trace: an eager call has no graph to find them in)."""
            probs = twin(x, training=False)
            logits = getattr(probs, "_keras_logits", probs.op.inputs[0] if probs.op.type == "Softmax" else None)
            self.from_logits = logits is not None
            return probs, probs if logits is None else logits

        self.outputs = outputs
        outputs.get_concrete_function()  # traced now, so the loss knows what it reads
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)

    def __call__(self, model, data, split: str = "test") -> dict[str, float]:
        """As Keras's metrics sum them: each batch's mean loss weighted by its size, in float32."""
        import tensorflow as tf

        if model is not self.twin:
            assign_all(self.twin.variables, model.variables)
        total = hits = count = np.float32(0)
        for x, y in batches(data, split, 256):
            probs, logits = self.outputs(np.asarray(x, "float32"))
            y, n = tf.constant(y, "int32"), np.float32(len(y))
            loss = self.loss(y, logits)
            right = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type="int32"), y), "float32"))
            total, hits, count = total + np.float32(loss) * n, hits + np.float32(right), count + n
        return {"accuracy": float(hits / count), "loss": float(total / count)}

    def forward(self, weights=None):
        """The compiled forward pass (latency) of the twin, holding `weights` if given."""
        if weights is not None:
            assign_all(self.twin.variables, weights)
        return lambda batch: self.outputs(batch)[0]


_evaluators: collections.OrderedDict = collections.OrderedDict()


def evaluator(model) -> Evaluator:
    """The process's Evaluator for this model structure, with a twin of its own."""
    key = json.dumps([structure(model), keras.mixed_precision.global_policy().name])
    return cached(_evaluators, key, lambda: Evaluator(keras.models.clone_model(model)))


def test_metrics(model, data, split: str = "test", once: bool = False) -> dict[str, float]:
    """Accuracy and loss on the test split (or `split`), by the Evaluator of the model's structure, or with
    `once` (a structure evaluated once) by one made on the model."""
    return (Evaluator(model) if once else evaluator(model))(model, data, split)


def batches(data, split: str, size: int):
    """A split's (images, labels) in order, in batches of `size`: sliced where held in memory, else its tf.data
    batches."""
    held = data.held(split)
    if held is None:
        yield from data.batches(split, size).as_numpy_iterator()
        return
    x, y = held
    for i in range(0, len(y), size):
        yield x[i:i + size], y[i:i + size]


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


def evaluate(model, data, dense_weights=None, small_model=None, latency: str = "auto") -> dict[str, float]:
    """The eval/ metrics: `model` is the masked model; `small_model` its shrunk form, if any.
    `accuracy` and `loss` are the final model's (the shrunk one where it exists), `masked_accuracy`
    the masked model's, so that each logged model's accuracy can be checked. Latency of the dense model
    (`dense_weights` in a model of `model`'s structure) against the final model as eval.latency says (see
    measures_latency)."""
    final = small_model if small_model is not None else model
    own = Evaluator(small_model) if small_model is not None else None  # its scores and latency: one trace
    out = (own or evaluator(model))(final, data)
    out["masked_accuracy"] = test_metrics(model, data)["accuracy"] if small_model is not None else out["accuracy"]
    out.update(weight_metrics(model, small_model))
    if dense_weights is not None and measures_latency(latency, small_model is not None):
        x = data.sample(max(LATENCY_REPEATS)).astype("float32")
        forwards = [evaluator(model).forward(dense_weights), (own or Evaluator(model)).forward()]
        for batch, repeats in LATENCY_REPEATS.items():
            suffix = "" if batch == 1 else f"_b{batch}"
            dense_ms, pruned_ms = paired_latency_ms(forwards, x[:batch], repeats)
            out[f"latency_ms_dense{suffix}"], out[f"latency_ms_pruned{suffix}"] = dense_ms, pruned_ms
        out["speedup_measured"] = out["latency_ms_dense_b256"] / out["latency_ms_pruned_b256"]
    return out
