"""What both peer scripts share: the grid, the budgets read from conf/, the step timer, the JSON rows.

Imports neither Keras 3 nor tf_keras (the timer is built on whichever Callback class it is given), so the
TF-MOT process and ours can both use it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import time
from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = ("seed_cnn", "vgg_bn")
TARGETS = (0.5, 0.7, 0.8, 0.9)
SEEDS = (0, 1, 2)


def conf(group: str, name: str) -> dict:
    """One config file of conf/<group>/<name>.yaml as a plain dict (no Hydra, no Keras)."""
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=True)


def budgets(training: str = "default") -> tuple[dict, dict]:
    """The baseline and fine-tune phases of conf/training/<training>.yaml, with the Phase defaults."""
    defaults = {"epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
                "weight_decay": 0.0}
    t = conf("training", training)
    return {**defaults, **t["baseline"]}, {**defaults, **t["finetune"]}


def gradual() -> dict:
    """conf/sparsity/gradual.yaml: the fraction of fine-tuning over which the rate ramps, and how often."""
    g = conf("sparsity", "gradual")
    return {"initial_sparsity": float(g.get("initial_sparsity", 0.0)), "begin": float(g.get("begin", 0.0)),
            "end": float(g.get("end", 0.6)), "frequency": int(g.get("frequency", 10))}


def ramp_steps(total: int, g: dict) -> tuple[int, int]:
    """Begin and end step of the ramp, as pipeline.pruning.schedule.Gradual computes them."""
    begin = int(g["begin"] * total)
    return begin, max(begin + 1, int(g["end"] * total))


def parse(description: str, default_out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: seed_cnn,vgg_bn")
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    p.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    p.add_argument("--schedules", default="one_shot,gradual")
    p.add_argument("--training", default="default", help="conf/training/<name>.yaml for both budgets")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override (quick debugging only)")
    p.add_argument("--baseline-epochs", type=int, default=None, help="override (quick debugging only)")
    args = p.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.targets = [float(t) for t in args.targets.split(",") if t]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.schedules = [s for s in args.schedules.split(",") if s]
    return args


def phases(args) -> tuple[dict, dict]:
    base, ft = budgets(args.training)
    if args.baseline_epochs:
        base["epochs"] = args.baseline_epochs
    if args.finetune_epochs:
        ft["epochs"] = args.finetune_epochs
    return base, ft


def make_step_timer(callback_base):
    """A Callback (of the given Keras) recording the training time per step of every epoch.

    An epoch's training part runs from its start to the start of its validation pass; divided by its steps,
    it includes whatever other callbacks do around the steps (TF-MOT's UpdatePruningStep, our mask updates).
    Timed per epoch, not per batch: a per-batch callback would itself force one call per step, the very cost
    that several steps per compiled call remove. The first epoch (tracing) is left out.
    """

    class StepTimer(callback_base):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []
            self.epoch, self.start = 0, None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.start = epoch, time.perf_counter()

        def on_test_begin(self, logs=None):
            if self.start is not None and self.epoch >= 1:
                self.times.append((time.perf_counter() - self.start) * 1000 / self.params["steps"])
            self.start = None

        def summary(self) -> dict[str, float]:
            if not self.times:
                return {"step_ms": float("nan"), "step_ms_mean": float("nan"), "steps_timed": 0}
            return {"step_ms": statistics.median(self.times), "step_ms_mean": statistics.fmean(self.times),
                    "steps_timed": len(self.times) * self.params["steps"]}

    return StepTimer


def gzip_bytes(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def environment(**extra) -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def write(path: str, meta: dict, rows: list[dict], quiet: bool = False) -> None:
    """Rewritten after every row, so an interrupted run leaves what it measured (meta says if complete)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    tmp.replace(path)
    if not quiet:
        print(f"wrote {path} ({len(rows)} rows)", flush=True)
