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
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from pipeline.config import stable_hash

log = logging.getLogger(__name__)


def baseline_spec(cfg: dict[str, Any], penalty: dict | None) -> dict[str, Any]:
    """Everything that determines a trained dense model, and nothing else."""
    return {"data": cfg["data"], "model": cfg["model"], "training": cfg["training"]["baseline"],
            "deterministic": cfg["training"]["deterministic"], "seed": cfg["seed"], "penalty": penalty}


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
    history, path)` is called once, by the process that trained it."""
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
        return model, key, True
