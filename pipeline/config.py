"""Config schemas and start-up validation.

Groups with a `_target_` (data, model, method, sparsity) are validated against the dataclass they
instantiate: the class is the schema. training and tracking have their schemas here. Validation
imports no TensorFlow, so a bad override fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

TARGET_GROUPS = ("data", "model", "method", "sparsity")
TOP_LEVEL_KEYS = {"data", "model", "training", "method", "sparsity", "tracking", "eval", "seed", "hydra"}
SEED_LIMIT = 2**32  # numpy's and Keras's seeds are unsigned 32-bit integers
PACKAGE = Path(__file__).resolve().parent
WHERE_NOT_WHAT = {"path", "root", "download"}  # where data is found: its digest stands for what it is


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, exit status 2."""


def exit_config_error(e: Exception) -> None:
    """Report a configuration mistake in one line and exit with status 2."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming the key, the value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


@dataclass
class Phase:
    """One training phase (baseline or fine-tuning)."""

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # the lr over the phase: constant, cosine (to 0 at the end), step (/10 at 50%, 75%)

    SCHEDULES = ("constant", "cosine", "step")

    def check(self, key: str) -> None:
        require(self.epochs > 0, f"{key}.epochs", self.epochs, "an integer > 0")
        require(self.batch_size > 0, f"{key}.batch_size", self.batch_size, "an integer > 0")
        require(self.optimizer in ("adam", "sgd"), f"{key}.optimizer", self.optimizer, "adam or sgd")
        require(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        require(0 <= self.momentum < 1, f"{key}.momentum", self.momentum, "a number in [0, 1)")
        require(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "a number >= 0")
        require(self.schedule in self.SCHEDULES, f"{key}.schedule", self.schedule, ", ".join(self.SCHEDULES))


@dataclass
class Training:
    name: str = "default"
    baseline: Phase = field(default_factory=Phase)
    finetune: Phase = field(default_factory=Phase)
    deterministic: bool = True
    mixed_precision: str | None = None  # Keras dtype policy: mixed_float16 (loss scaling) or mixed_bfloat16
    jit_compile: bool | None = None  # XLA; None: Keras decides (on a GPU when the model supports it)
    # after each phase, BatchNorm statistics recomputed on this many training images (0: off)
    bn_recalibration: int = 4096

    PRECISIONS = ("mixed_float16", "mixed_bfloat16")

    def __post_init__(self):
        self.baseline.check("baseline")
        self.finetune.check("finetune")
        require(self.mixed_precision in (None, *self.PRECISIONS), "mixed_precision", self.mixed_precision,
                f"null (float32) or one of {', '.join(self.PRECISIONS)}")
        require(not (self.jit_compile and self.deterministic), "jit_compile", self.jit_compile,
                "false or null while training.deterministic=true (Keras runs deterministic ops without XLA); "
                "set training.deterministic=false for XLA")
        require(self.bn_recalibration >= 0, "bn_recalibration", self.bn_recalibration,
                "an integer >= 0 (training images whose batch statistics become BatchNorm's; 0: off)")


@dataclass
class Tracking:
    name: str = "local"
    enabled: bool = True
    uri: str | None = None
    experiment: str = "pruning"
    skip_finished: bool = True
    # With a tracking server: seconds a worker waits for another one's baseline to show a sign of life
    # before it takes the training over (a trainer on this host that has died is taken over at once)
    claim_timeout: float = 600.0

    def __post_init__(self):
        require(bool(self.experiment), "experiment", self.experiment, "a non-empty name")
        require(self.claim_timeout > 0, "claim_timeout", self.claim_timeout, "a number of seconds > 0")


@dataclass
class Eval:
    """What the evaluate stage measures besides accuracy, sparsity, size and FLOPs."""

    latency: str = "auto"  # auto: a physically shrunk model's (structured methods) only; always; never

    LATENCY = ("auto", "always", "never")

    def __post_init__(self):
        require(self.latency in self.LATENCY, "latency", self.latency, ", ".join(self.LATENCY))


PLAIN_SCHEMAS = {"training": Training, "tracking": Tracking, "eval": Eval}
GROUP_BASES = {  # what a `_target_` of each group may name: a dataclass deriving from these
    "data": "pipeline.data.DataSource",
    "model": "pipeline.models.ModelSpec",
    "method": "pipeline.pruning.base.PruningMethod",
    "sparsity": "pipeline.pruning.schedule.Schedule",
}


def _schema_of(group: str, node: DictConfig) -> type:
    if group in PLAIN_SCHEMAS:
        return PLAIN_SCHEMAS[group]
    from hydra.utils import get_class

    target = node.get("_target_")
    require(isinstance(target, str), f"{group}._target_", target, "the dotted path of a class")
    try:
        cls, base = get_class(target), get_class(GROUP_BASES[group])
    except Exception as e:
        raise ConfigError(f"{group}._target_={target!r} cannot be imported: {e}") from None
    require(issubclass(cls, base), f"{group}._target_", target, f"a subclass of {GROUP_BASES[group]}")
    return cls


def _one_line(e: OmegaConfBaseException, group: str) -> str:
    msg = str(e).splitlines()[0]
    key = f"{group}.{e.full_key}" if getattr(e, "full_key", None) else group
    if isinstance(e, ConfigKeyError):
        return f"{key}: unknown key ({msg})"
    return f"{key}: {msg}"


def build(group: str, node: DictConfig) -> Any:
    """Check one group's node against its schema and return the constructed object."""
    schema = _schema_of(group, node)
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    allowed = sorted(f.name for f in dataclasses.fields(schema))
    for key in values:
        require(key in allowed, f"{group}.{key}", values[key], f"one of the keys {', '.join(allowed)}")
    if group in TARGET_GROUPS and "name" in values:  # the name reported is the class's, never a free label
        own = next(f.default for f in dataclasses.fields(schema) if f.name == "name")
        require(values["name"] == own, f"{group}.name", values["name"],
                f"{own!r}, the name of {group}._target_={node.get('_target_')} (leave {group}.name out)")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(typed)
    except (ValidationError, ConfigKeyError) as e:
        raise ConfigError(_one_line(e, group)) from None
    except ConfigError as e:
        raise ConfigError(f"{group}.{e}") from None


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the whole job config; return the built objects of each group."""
    for key in cfg:
        require(key in TOP_LEVEL_KEYS, str(key), cfg[key], f"one of {', '.join(sorted(TOP_LEVEL_KEYS))}")
    for group in (*TARGET_GROUPS, *PLAIN_SCHEMAS):
        require(isinstance(cfg.get(group), DictConfig), group, cfg.get(group), "a config group")
    seed = cfg.get("seed")
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT, "seed", seed,
            f"an integer in [0, {SEED_LIMIT - 1}]")
    parts = {group: build(group, cfg[group]) for group in (*TARGET_GROUPS, *PLAIN_SCHEMAS)}
    parts["method"].check(parts["sparsity"])  # a method may fix its own target (e.g. nm: 1 - n/m)
    return parts


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config of a job, without Hydra's own settings."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """A hash of the package's source (every .py file under pipeline/): unlike a git commit, it also
    changes with uncommitted edits."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def identity(seed: int, parts: dict[str, Any], data_digest: str) -> dict[str, Any]:
    """What determines a job's result: each group as its schema filled it (defaults included; where
    it is tracked and where its data lies aside), the seed, the data's content and the code."""
    groups = {group: {"_target_": f"{type(obj).__module__}.{type(obj).__qualname__}",
                      **{k: v for k, v in dataclasses.asdict(obj).items() if k not in WHERE_NOT_WHAT}}
              for group, obj in parts.items() if group != "tracking"}
    if "model" in groups:  # a model file: its content, not where it lies
        groups["model"].update(parts["model"].content())
    return {**groups, "seed": seed, "data_digest": data_digest, "code_version": code_version()}


def config_hash(ident: dict[str, Any]) -> str:
    """A job's identity as a short hash: equal hashes, equal results."""
    return stable_hash(ident)


def run_name(method: str, target: float) -> str:
    """`<method>-<target>`: two decimals where they are exact, else every digit (0.5000001 is not 0.50)."""
    short = f"{target:.2f}"
    return f"{method}-{short if float(short) == target else repr(float(target))}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (lists kept as one value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
