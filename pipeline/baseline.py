"""Train each baseline once: a dense model is identified by a hash of exactly the config that
determines it, kept on disk beside the tracking store, and reused by every job that shares it.

Safe across processes: one job trains while the others wait on a file lock, then load. A file that
fails to verify (checksum) or to load is trained again, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.config import stable_hash

log = logging.getLogger(__name__)


def baseline_spec(ident: dict[str, Any], penalty: dict | None) -> dict[str, Any]:
    """Everything that determines a trained dense model, and nothing else (`ident`: config.identity)."""
    return {**{k: ident[k] for k in ("data", "model", "seed", "data_digest", "code_version")},
            "training": ident["training"]["baseline"], "deterministic": ident["training"]["deterministic"],
            "penalty": penalty}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_verified(folder: Path):
    """The cached model if its file matches its recorded checksum and loads; else None."""
    import keras

    meta_path, model_path = folder / "meta.json", folder / "model.keras"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if _sha256(model_path) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        return keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as e:
        log.warning("baseline %s is unusable (%s): training it again", folder.name, e)
        return None


def obtain(spec: dict[str, Any], cache: Path, build: Callable, train: Callable,
           on_trained: Callable | None = None):
    """Return (model, hash, trained_now). `train(model)` returns its history; `on_trained(hash, model,
    history, path)` is called once, by the process that trained it. The model returned is always the
    one loaded from the cache, so a job's result cannot depend on whether it trained the baseline
    (training-only state such as a regularizer on a variable is not saved)."""
    key = stable_hash(spec)
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        model = load_verified(folder)
        if model is not None:
            return model, key, False
        model = build()
        history = train(model)
        tmp = folder / "model.tmp.keras"
        model.save(tmp)
        meta = {"hash": key, "spec": spec, "sha256": _sha256(tmp)}
        os.replace(tmp, folder / "model.keras")
        (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2, default=str))
        os.replace(folder / "meta.json.tmp", folder / "meta.json")
        if on_trained is not None:
            on_trained(key, model, history, folder / "model.keras")
        return load_verified(folder), key, True


def for_job(conf: dict[str, Any], parts: dict, data, client, exp_id, uri: str):
    """The job's trained dense model: (model, hash, trained_now). A baseline trained here is logged once,
    as its own run (tag kind=baseline)."""
    from pipeline import tracking
    from pipeline.config import identity
    from pipeline.stages.evaluate import test_metrics
    from pipeline.stages.train import train_baseline

    method, spec, phase = parts["method"], parts["model"], parts["training"].baseline
    build = lambda: spec.build(data.input_shape, data.num_classes)  # noqa: E731
    spec_b = baseline_spec(identity(conf["seed"], parts, data.digest), method.penalty(build()))

    def log_run(key, trained, history, path):
        if client is None:
            return
        tags = {"kind": "baseline", "baseline_hash": key}
        with tracking.Run(client, exp_id, f"baseline-{key[:8]}", tags) as b:
            b.params(tracking.params_of(spec_b))
            b.history("train", history)  # per epoch; baseline/* holds the test-set figures
            b.metrics(test_metrics(trained, data), prefix="baseline/")
            b.artifact(path, "model")

    return obtain(spec_b, tracking.store_dir(uri) / "baselines", build,
                  lambda m: train_baseline(m, data, phase, method), log_run)


def seed_everything(seed: int, deterministic: bool) -> None:
    """One seed for initialisation, shuffling and pruning; deterministic TF ops when asked."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()

