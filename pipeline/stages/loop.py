"""Compiled training loops: many optimizer steps per call, compiled once per process and model structure.

Keras's `model.fit` calls one compiled step per batch from Python, and traces its step anew for every
model it compiles. Here a fit makes one compiled call per epoch, and masks change exactly at a sparsity
schedule's steps: inside the call where the method has its masks as TensorFlow ops (PruningMethod.in_graph),
else the call is split at those steps. The step inside is Keras's
own `train_step` (loss, regularization, loss scaling, metrics, the optimizer applying the mask
constraints after every update), so the results are model.fit's.

Data held in memory (arrays, not augmented) never goes through tf.data per example: the compiled loop
gathers each batch from the split's tensors by the epoch's shuffled order (Held), the very batches the
tf.data pipeline (Stream) gives.

An Engine is a copy of a model with its optimizer, one mask variable per masked weight and the compiled
loops. It is kept per model structure and training phase, and reused by every later fit of the same
structure in this process (the jobs of a sweep): the model's variables, masks and a fresh optimizer
state are loaded into it, and the trained variables copied back.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import keras
import numpy as np

from pipeline.data import untuned
from pipeline.pruning.masks import MaskConstraint, assign_all, hold

CACHE_SIZE = 8  # engines (and evaluate.py's evaluators) kept per process, each holding a copy of its model
_engines: collections.OrderedDict = collections.OrderedDict()


def _masked_indices(model) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(model.variables) if isinstance(v.constraint, MaskConstraint))


def _regularizers(model) -> list:
    return [getattr(v, "regularizer", None) for v in model.variables]


def structure(model) -> str:
    """The model's architecture: its class and layer config, not how it was compiled (model.to_json()
    names the optimizer a loaded model was saved with, e.g. `rm_sprop_2`, anew in each job)."""
    return json.dumps([type(model).__name__, model.get_config()], default=str)


def _key(model, phase, total_steps: int, audit: bool, graph) -> str:
    """What the compiled loops depend on: the structure, the variables' regularizers and masks, the
    optimizer settings, the numerics, the masks' in-graph schedule. Not the weights, masks' values, epochs,
    batch size or the schedule's steps."""
    opt = dataclasses.replace(phase, epochs=0, batch_size=0)
    regs = [[i, type(r).__name__, r.get_config()] for i, r in enumerate(_regularizers(model)) if r is not None]
    return json.dumps([structure(model), regs, _masked_indices(model), dataclasses.asdict(opt),
                       total_steps if phase.schedule != "constant" else None, audit,
                       keras.mixed_precision.global_policy().name, _jit(), graph and graph.key,
                       graph and _indices(model, graph.paths)], default=str)


def _indices(model, paths) -> list[int]:
    order = [v.path for v in model.variables]
    return [order.index(p) for p in paths]


def _jit():
    from pipeline.stages import train

    return getattr(train, "JIT_COMPILE", "auto")


class Engine:
    """A model's twin with its optimizer and compiled train and validation loops."""

    def __init__(self, model, phase, total_steps: int, audit: bool = False, graph=None):
        import tensorflow as tf

        from pipeline.stages.train import compile_model

        self.twin = keras.models.clone_model(model)
        mine = self.twin.variables
        if [v.shape for v in mine] != [v.shape for v in model.variables]:
            raise ValueError("the clone's variables differ from the model's")
        for var, reg in zip(mine, _regularizers(model)):
            if reg is not None:
                var.regularizer = reg
        self.masked = _masked_indices(model)
        self.mask_vars = {}
        for i in self.masked:
            self.mask_vars[i] = keras.Variable(np.ones(mine[i].shape, mine[i].dtype), trainable=False,
                                               name=f"mask_{i}")
            mine[i].constraint = MaskConstraint(self.mask_vars[i])
        compile_model(self.twin, phase, total_steps)
        self.twin.optimizer.build(self.twin.trainable_variables)
        self.fresh_optimizer = [v.numpy() for v in self.twin.optimizer.variables]
        twin, pruned = self.twin, [(mine[i], self.mask_vars[i]) for i in self.masked]
        step = twin.train_step
        if twin.jit_compile:  # resolved by compile: XLA where it pays (GPU), never on CPU by default
            step = tf.function(step, jit_compile=True)

        def pruned_nonzero():
            return tf.add_n([tf.math.count_nonzero(tf.cast(w, "float32") * (1 - tf.cast(m, "float32")))
                             for w, m in pruned] or [tf.constant(0, tf.int64)])

        # A schedule's mask updates in the graph (graph: the method's InGraph): the steps run in stretches that
        # end where the next of `update_at` begins; before each stretch, if `steps_done` is one of `update_at`,
        # the masks of graph.paths shrink to what graph.keep keeps.
        self.graph, scheduled = graph, []
        if graph:
            self.steps_done = tf.Variable(0, trainable=False)
            self.update_at = tf.Variable(tf.zeros([0], tf.int32), shape=tf.TensorShape([None]), trainable=False)
            self.update_counts = tf.Variable(tf.zeros([0, 0], tf.int32), shape=tf.TensorShape([None, None]),
                                             trainable=False)
            scheduled = [(mine[i], self.mask_vars[i]) for i in _indices(model, graph.paths)]

        def update_masks():
            hit = tf.equal(self.update_at, self.steps_done)
            if tf.reduce_any(hit):
                counts = self.update_counts[tf.argmax(tf.cast(hit, tf.int32))]
                kept = graph.keep([w.value for w, _ in scheduled], counts)
                for (w, m), keep in zip(scheduled, kept):
                    mask = m * tf.cast(keep, m.dtype)
                    m.assign(mask)
                    w.assign(tf.where(mask != 0, w, tf.zeros_like(w)))

        def until_next_update():
            later = tf.where(self.update_at > self.steps_done, self.update_at, tf.int32.max)
            return tf.reduce_min(later) - self.steps_done

        def stretch(batch, begin, end, worst):
            for i in tf.range(begin, end):
                step(batch(i))
                if audit:  # the audit build checks every step that no pruned weight is non-zero
                    worst = tf.maximum(worst, pruned_nonzero())
            return worst

        def steps(batch, begin, end):
            worst = tf.constant(0, tf.int64)
            if graph:
                while begin < end:
                    update_masks()
                    n = tf.minimum(end - begin, until_next_update())
                    worst = stretch(batch, begin, begin + n, worst)
                    self.steps_done.assign_add(n)
                    begin += n
            else:
                worst = stretch(batch, begin, end, worst)
            return twin.get_metrics_result(), worst

        @tf.function(reduce_retracing=True)
        def train_stream(iterator, n):
            return steps(lambda i: next(iterator), 0, n)

        @tf.function(reduce_retracing=True)
        def train_held(x, y, order, size, begin, end):
            def batch(i):
                indices = order[i * size:(i + 1) * size]
                return tf.gather(x, indices), tf.gather(y, indices)

            return steps(batch, begin, end)

        self.train_stream, self.train_held, self.pruned_nonzero = train_stream, train_held, pruned_nonzero
        self.validate_stream, self.validate_held = test_loops(twin)

    def load(self, model, updates=None) -> None:
        """Copy the model's variables and masks in, reset the optimizer's state to a fresh one's, and take the
        mask updates' steps and counts where they run in the graph."""
        theirs = model.variables
        assign_all([*self.twin.variables, *self.mask_vars.values(), *self.twin.optimizer.variables],
                   [*theirs, *(theirs[i].constraint.mask for i in self.mask_vars), *self.fresh_optimizer])
        self.by_path = dict(zip((v.path for v in theirs), self.twin.variables))  # the paths may differ
        if self.graph:
            at = sorted(updates.rates)
            self.steps_done.assign(0)
            self.update_at.assign(np.array(at, np.int32))
            self.update_counts.assign(np.array([updates.graph.counts(updates.rates[s]) for s in at], np.int32))

    def store(self, model) -> None:
        """Copy the variables and masks out to the model."""
        theirs = model.variables
        assign_all([*theirs, *(theirs[i].constraint.mask for i in self.mask_vars)],
                   [*self.twin.variables, *self.mask_vars.values()])


def test_loops(twin):
    """A compiled model's test loops, returning its metrics: over a tf.data dataset of batches (Stream), and
    over tensors held in memory, in order, in batches of `size` (Held)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def validate_stream(dataset):
        for batch in dataset:
            twin.test_step(batch)
        return twin.get_metrics_result()

    @tf.function(reduce_retracing=True)
    def validate_held(x, y, size):
        for i in tf.range((tf.shape(x)[0] + size - 1) // size):
            twin.test_step((x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]))
        return twin.get_metrics_result()

    return validate_stream, validate_held


class Stream:
    """Batches from a tf.data pipeline (files, augmentation), iterated anew each epoch."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self) -> None:
        self.iterator = iter(self.batches)

    def train(self, eng: Engine, begin: int, end: int):
        """Steps begin..end-1 of this epoch (the iterator is at step begin)."""
        import tensorflow as tf

        return eng.train_stream(self.iterator, tf.constant(end - begin))

    def validate(self, eng: Engine):
        return eng.validate_stream(self.batches)


class Held:
    """A split held in memory as tensors, in batches of batch_size: shuffled anew each epoch by shuffle_seed
    (tf.data's shuffle of the indices, so the same orders as examples(split, shuffle_seed)), or in order."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None = None):
        import tensorflow as tf

        self.x, self.y, self.size = tf.constant(x), tf.constant(y), tf.constant(batch_size)
        n = len(x)
        # One iterator over the shuffles repeated gives the orders that a new iterator per epoch gives, at a
        # fifth of the cost (a tf.data iterator takes milliseconds to make)
        self.shuffles = None if shuffle_seed is None else untuned(
            tf.data.Dataset.range(n).shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True).batch(n).repeat())
        self.orders = None if self.shuffles is None else iter(self.shuffles)

    def epoch(self) -> None:
        self.order = next(self.orders)

    def train(self, eng: Engine, begin: int, end: int):
        import tensorflow as tf

        return eng.train_held(self.x, self.y, self.order, self.size, tf.constant(begin), tf.constant(end))

    def validate(self, eng: Engine):
        return eng.validate_held(self.x, self.y, self.size)


def in_order(data, split: str, batch_size: int) -> Held | Stream:
    """A split in order (validation, test): held in memory where the data set holds it, else its tf.data batches."""
    held = data.held(split)
    return Held(*held, batch_size) if held is not None else Stream(data.batches(split, batch_size))


def cached(cache: collections.OrderedDict, key: str, make):
    """cache[key], made by make() on first use; the CACHE_SIZE most recently used are kept."""
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = make()
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return cache[key]


def engine(model, phase, total_steps: int, audit: bool = False, graph=None) -> Engine:
    """The process's engine for this model structure and phase (made, and traced, on first use)."""
    return cached(_engines, _key(model, phase, total_steps, audit, graph),
                  lambda: Engine(model, phase, total_steps, audit, graph))


def run(model, train_data: Stream | Held, val_data: Stream | Held, phase, steps_per_epoch: int, callbacks,
        updates=None, audit: bool = False) -> dict[str, list[float]]:
    """Fit `model` for phase.epochs of `steps_per_epoch` steps on `train_data` (shuffled anew each epoch),
    validating on `val_data` after each; the masks follow `updates` (train.fit): inside the compiled loop where
    the method has in-graph masks, else computed from the engine's twin at a stop before each of its steps.
    Keras callbacks get epoch and test events and one batch event per compiled call; the model holds the
    trained weights at every epoch end.
    Returns the history (per epoch: loss, metrics, val_ metrics, whatever callbacks add to the logs;
    `pruned_nonzero` with `audit`: the most pruned weights found non-zero after any step, i.e. 0)."""
    graph = updates.graph if updates else None
    stops = updates.rates if updates and not graph else {}
    total = steps_per_epoch * phase.epochs
    eng = engine(model, phase, total, audit, graph)
    eng.load(model, updates)
    history = keras.callbacks.History()  # last: it records what the callbacks before it add to the logs
    cbs = keras.callbacks.CallbackList([*callbacks, history], model=model, epochs=phase.epochs,
                                       steps=steps_per_epoch, verbose=0)
    model.stop_training = False
    cbs.on_train_begin()
    for epoch in range(phase.epochs):
        eng.twin.reset_metrics()
        cbs.on_epoch_begin(epoch)
        train_data.epoch()
        first = epoch * steps_per_epoch
        bounds = sorted({first, first + steps_per_epoch} | {s for s in stops if first < s < first + steps_per_epoch})
        worst = 0
        for begin, end in zip(bounds, bounds[1:]):
            if begin in stops:
                hold(eng.by_path, updates.at(begin, eng.twin))
            cbs.on_train_batch_begin(begin - first)
            logs, nonzero = train_data.train(eng, begin - first, end - first)
            worst = max(worst, int(nonzero))
            cbs.on_train_batch_end(end - first - 1, logs)
        logs = {k: float(v) for k, v in logs.items()}
        eng.twin.reset_metrics()
        cbs.on_test_begin()
        val = {f"val_{k}": float(v) for k, v in val_data.validate(eng).items()}
        cbs.on_test_end(val)
        logs.update(val)
        if audit:
            logs["pruned_nonzero"] = worst
        train_data.epoch()  # model.fit opens one more iterator at each epoch's end: the same shuffles as it
        eng.store(model)
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end(logs)
    return {k: [float(v) for v in values] for k, values in history.history.items()}
