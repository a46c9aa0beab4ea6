"""python -m pipeline.sensitivity: how much each conv layer's validation accuracy suffers when only its
filters are pruned, without fine-tuning (Li et al. 2017, sec. 4.1) -- and the per-layer rates that follow.

For each layer with prunable filters (pipeline.pruning.filter.filter_groups) and each rate of
sensitivity.ratios, the L1-norm method prunes that layer alone (Filter(ratios={layer: r}) at target 0),
the accuracy on the validation split is measured, and the weights are restored. The rates are chosen on
the validation split only: the test split gives the reported baseline/accuracy and nothing else. The
baseline is trained (or reused) exactly as python -m pipeline.run does, so both share the cached model.
One MLflow run `sensitivity-<model>` (tag kind=sensitivity) gets baseline/val_accuracy, the metrics
sensitivity/<layer>/val_accuracy (step = rate in percent), the table sensitivity.csv, the plot
sensitivity.png and filter_ratios.yaml: for each layer the largest rate whose validation-accuracy drop is
<= sensitivity.max_drop, a mapping ready for method.ratios. The matching override for
python -m pipeline.run is printed.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline import tracking
from pipeline.config import ConfigError, _one_line, exit_config_error, job_config, require, validate

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("pipeline")
TOLERANCE = 1e-9  # accuracies are fractions of the validation set: compare drops without float noise


@dataclass
class Sensitivity:
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    max_drop: float = 0.02

    def __post_init__(self):
        require(len(self.ratios) > 0 and all(0 < r < 1 for r in self.ratios), "ratios", self.ratios,
                "a non-empty list of numbers in (0, 1)")
        require(self.max_drop >= 0, "max_drop", self.max_drop, "a number >= 0")


def settings(node) -> Sensitivity:
    """The sensitivity block of the config, checked."""
    if node is None:
        return Sensitivity()
    require(isinstance(node, DictConfig), "sensitivity", node, "a mapping with ratios and max_drop")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Sensitivity), node))
    except (ValidationError, ConfigKeyError) as e:
        raise ConfigError(_one_line(e, "sensitivity")) from None
    except ConfigError as e:
        raise ConfigError(f"sensitivity.{e}") from None


def val_accuracy(model, data) -> float:
    """Accuracy on the validation split: the scan decides on it, never on the test split."""
    predicted = model.predict(data.batches("val", 256), verbose=0).argmax(axis=1)
    return float((predicted == data.y_val).mean())


def scan(model, data, ratios) -> pd.DataFrame:
    """Validation accuracy with one layer's filters pruned at each rate (0 included), no fine-tuning.

    Columns: layer, ratio, val_accuracy, drop (= the layer's val_accuracy at rate 0 minus val_accuracy).
    The model's weights are the same afterwards."""
    import numpy as np
    import pandas as pd

    from pipeline.pruning.filter import Filter, filter_groups
    from pipeline.pruning.masks import variables_by_path

    rates = sorted({0.0, *(float(r) for r in ratios)})
    variables = variables_by_path(model)
    original = model.get_weights()
    rows = []
    try:
        for group in filter_groups(model):
            for rate in rates:
                masks = Filter(ratios={group.name: rate}).masks(model, 0.0)
                for path, mask in masks.items():
                    if not mask.all():
                        var = variables[path]
                        var.assign(np.asarray(var.numpy()) * mask)
                rows.append({"layer": group.name, "ratio": rate, "val_accuracy": val_accuracy(model, data)})
                model.set_weights(original)
    finally:
        model.set_weights(original)
    df = pd.DataFrame(rows, columns=["layer", "ratio", "val_accuracy"])
    reference = df[df["ratio"] == 0.0].set_index("layer")["val_accuracy"]
    df["drop"] = df["layer"].map(reference) - df["val_accuracy"]
    return df


def suggest(df, max_drop: float) -> dict[str, float]:
    """Per layer (in the table's order), the largest rate whose accuracy drop is <= max_drop (0 if none)."""
    out = {}
    for layer, rows in df.groupby("layer", sort=False):
        ok = rows[rows["drop"] <= max_drop + TOLERANCE]
        out[str(layer)] = round(float(ok["ratio"].max()), 4) if len(ok) else 0.0
    return out


def ratios_yaml(ratios: dict[str, float]) -> str:
    """A YAML mapping usable as method.ratios."""
    import yaml

    return yaml.safe_dump(ratios, sort_keys=False, default_flow_style=False)


def override(ratios: dict[str, float]) -> str:
    """The python -m pipeline.run overrides (shell-quoted) that apply these per-layer rates."""
    body = ",".join(f"{layer}:{float(rate)}" for layer, rate in ratios.items())
    return f"method=filter '++method.ratios={{{body}}}'"


def plot(df, path: Path, max_drop: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, rows in df.groupby("layer", sort=False):
        ax.plot(rows["ratio"], rows["val_accuracy"], marker="o", label=str(layer))
    baseline = float(df[df["ratio"] == 0.0]["val_accuracy"].mean())
    ax.axhline(baseline - max_drop, color="grey", linestyle=":", label=f"baseline - {max_drop:g}")
    ax.set_xlabel("fraction of the layer's filters pruned (smallest L1 norm)")
    ax.set_ylabel("validation accuracy (no fine-tuning)")
    ax.set_title("Sensitivity to filter pruning, one layer at a time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_scan(cfg: DictConfig, parts: dict, data, sens: Sensitivity, out_dir: Path) -> dict:
    from pipeline import baseline
    from pipeline.stages.evaluate import test_metrics

    spec, track = parts["model"], parts["tracking"]
    for warning in data.warnings:
        log.warning("%s", warning)
    baseline.seed_everything(cfg.seed, parts["training"].deterministic)
    conf = job_config(cfg)
    store = tracking.Store(track)
    client, exp_id = store.client, store.exp_id

    # no config_hash tag: report and verify take runs with one for jobs of python -m pipeline.run
    tags = {"kind": "sensitivity", "model": spec.name, "data_digest": data.digest}
    if data.warnings:
        tags["data_warnings"] = "; ".join(data.warnings)  # as pipeline.run tags its jobs
    with tracking.Run(client, exp_id, f"sensitivity-{spec.name}", tags) as run:
        run.params(tracking.params_of(conf))
        run.text(OmegaConf.to_yaml(conf), "config.yaml")
        model, bhash, trained = baseline.for_job(conf, parts, data, store)
        run.tag("baseline_hash", bhash)
        run.tag("baseline_trained_here", str(trained).lower())
        run.metrics(test_metrics(model, data) | {"val_accuracy": val_accuracy(model, data)}, prefix="baseline/")

        df = scan(model, data, sens.ratios)
        for rate, rows in df.groupby("ratio"):
            run.metrics({f"sensitivity/{r.layer}/val_accuracy": r.val_accuracy for r in rows.itertuples()},
                        step=round(rate * 100))
        suggested = suggest(df, sens.max_drop)
        line = override(suggested)
        run.metrics({f"suggested/{layer}/ratio": rate for layer, rate in suggested.items()})
        run.tag("suggested_override", line)

        out_dir.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_dir / "sensitivity.csv", index=False)
        plot(df, out_dir / "sensitivity.png", sens.max_drop)
        header = (f"# method.ratios: per layer, the largest filter-pruning rate whose validation-accuracy "
                  f"drop without fine-tuning is <= {sens.max_drop:g}\n# python -m pipeline.run {line}\n")
        (out_dir / "filter_ratios.yaml").write_text(header + ratios_yaml(suggested))
        for name in ("sensitivity.csv", "sensitivity.png", "filter_ratios.yaml"):
            run.artifact(out_dir / name)

    table = df.pivot(index="ratio", columns="layer", values="val_accuracy")[list(suggested)]
    print(f"validation accuracy, one layer's filters pruned (no fine-tuning), baseline "
          f"{run.logged['baseline/val_accuracy']:.4f} (test accuracy {run.logged['baseline/accuracy']:.4f}):"
          f"\n{table.to_string(float_format=lambda v: f'{v:.4f}')}")
    print(f"suggested per-layer rates (validation-accuracy drop <= {sens.max_drop:g}): {suggested}")
    print(f"python -m pipeline.run {line}")
    log.info("sensitivity-%s written to %s (run %s)", spec.name, out_dir, run.id)
    return {"run_id": run.id, "ratios": suggested}


def _check_prunable(spec, data) -> None:
    from pipeline.pruning.filter import filter_groups

    if not filter_groups(spec.build(data.input_shape, data.num_classes)):
        raise ConfigError(f"model={spec.name} has no conv layer whose filters can be pruned on their own")


@hydra.main(version_base="1.3", config_path="../conf", config_name="sensitivity")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    try:  # configuration and data mistakes: one line, exit 2, nothing written
        sens = settings(cfg.get("sensitivity"))
        regular = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "sensitivity"])
        parts = validate(regular)
        data = parts["data"].load(cfg.seed)
        _check_prunable(parts["model"], data)
        if parts["tracking"].enabled:
            tracking.check_store(tracking.resolve_uri(parts["tracking"].uri))
    except ConfigError as e:
        exit_config_error(e)
    return run_scan(cfg, parts, data, sens, Path(HydraConfig.get().runtime.output_dir))


def cli() -> None:
    """As pipeline.run.cli: configuration mistakes end with one line and exit status 2."""
    from hydra.errors import HydraException

    if any(a in ("-m", "--multirun") or a.startswith("--multirun=") for a in sys.argv[1:]):
        exit_config_error(ConfigError("pipeline.sensitivity runs one scan; --multirun is not supported"))
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        exit_config_error(e)


if __name__ == "__main__":
    cli()
