"""Check a finished run against its own artifacts: python -m pipeline.verify <run_id> [--uri URI]

Downloads the run's final model (`model/model.keras`) and masks (`masks.npz`), checks that every weight a
mask prunes is exactly zero, rebuilds the test data from the run's logged `config.yaml`, evaluates the
model and compares the test accuracy with the logged metric `eval/accuracy`. Where structured pruning
logged a physically smaller model (`model/shrunk.keras`), that is the model `eval/accuracy` was measured
on, so that one is evaluated too. The run gets the tag `verified` = "true" or "false".

Exit status: 0 when everything holds, 1 when something differs (each difference on its own line),
2 when the run or the tracking store cannot be found (one line).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ACCURACY_TOLERANCE = 1e-4
ACCURACY_METRIC = "eval/accuracy"


class VerifyError(Exception):
    """The run cannot be verified at all (unknown run, unreachable store): exit status 2."""


def _download(client, run_id: str, path: str, dst: Path) -> Path | None:
    """The artifact's local path, or None if the run has no such artifact."""
    folder, _, name = path.rpartition("/")
    listed = {Path(f.path).name for f in client.list_artifacts(run_id, folder or None)}
    if name not in listed:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst)))


def _test_accuracy(model, data) -> float:
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, acc = model.evaluate(data.x_test, data.y_test, batch_size=256, verbose=0)
    return float(acc)


def mask_problems(model, masks: dict[str, np.ndarray]) -> list[str]:
    """Every weight whose mask is False must be exactly zero."""
    variables = {v.path: v for v in model.weights}
    problems = []
    for path, mask in sorted(masks.items()):
        if path not in variables:
            problems.append(f"masks.npz names {path!r}, which the model does not have")
            continue
        w = np.asarray(variables[path].numpy())
        if w.shape != mask.shape:
            problems.append(f"{path}: mask shape {mask.shape} differs from weight shape {w.shape}")
            continue
        bad = int(np.count_nonzero(w[~mask]))
        if bad:
            problems.append(f"{path}: {bad} of {int((~mask).sum())} pruned weights are non-zero "
                            f"(largest {float(np.abs(w[~mask]).max()):.3g})")
    return problems


def verify(client, run_id: str, tag: bool = True, report=print) -> list[str]:
    """What differs between the run's logged results and its artifacts ([] = all holds).
    Raises VerifyError if the run does not exist. Sets the tag `verified` unless tag=False."""
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise VerifyError(f"no run {run_id!r} in {client.tracking_uri}: {str(e).splitlines()[0]}") from None
    if "config_hash" not in run.data.tags:
        kind = run.data.tags.get("kind", "unknown")
        raise VerifyError(f"run {run_id} is not a job's run (kind={kind}): only job runs can be verified")
    problems: list[str] = []
    if run.info.status != "FINISHED":
        problems.append(f"run status is {run.info.status}, not FINISHED")
    logged = run.data.metrics.get(ACCURACY_METRIC)
    if logged is None:
        problems.append(f"no metric {ACCURACY_METRIC} was logged")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {name: _download(client, run_id, name, tmp)
                 for name in ("model/model.keras", "masks.npz", "config.yaml", "model/shrunk.keras")}
        for name in ("model/model.keras", "masks.npz", "config.yaml"):
            if paths[name] is None:
                problems.append(f"artifact {name} is missing")
        if paths["model/model.keras"] is None or paths["config.yaml"] is None:
            _tag(client, run_id, problems, tag)
            return problems

        import keras

        import pipeline.models  # noqa: F401  (registers the custom layers, if any, for safe loading)
        from pipeline.config import ConfigError, build
        from pipeline.pruning.masks import load_masks

        model = keras.saving.load_model(paths["model/model.keras"], compile=False, safe_mode=True)
        if paths["masks.npz"] is not None:
            masks = load_masks(paths["masks.npz"])
            problems += mask_problems(model, masks)
            report(f"masks: {len(masks)} pruned weights checked, "
                   f"{sum(int((~m).sum()) for m in masks.values())} entries must be zero")

        conf = OmegaConf.create(paths["config.yaml"].read_text())
        try:
            data = build("data", conf.data).load(int(conf.seed))
        except ConfigError as e:
            problems.append(f"the run's data cannot be rebuilt: {e}")
            _tag(client, run_id, problems, tag)
            return problems
        final = paths["model/shrunk.keras"]
        evaluated = keras.saving.load_model(final, compile=False, safe_mode=True) if final else model
        acc = _test_accuracy(evaluated, data)
        which = "model/shrunk.keras" if final else "model/model.keras"
        report(f"accuracy: logged {ACCURACY_METRIC} = {logged if logged is None else f'{logged:.6f}'}, "
               f"re-evaluated ({which}) = {acc:.6f}")
        if logged is not None and abs(acc - logged) > ACCURACY_TOLERANCE:
            problems.append(f"{ACCURACY_METRIC}: logged {logged:.6f}, re-evaluated {acc:.6f} "
                            f"(tolerance {ACCURACY_TOLERANCE:g})")
    _tag(client, run_id, problems, tag)
    return problems


def _tag(client, run_id: str, problems: list[str], tag: bool) -> None:
    if tag:
        client.set_tag(run_id, "verified", "false" if problems else "true")


def main(argv: list[str] | None = None) -> int:
    from pipeline import tracking

    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.splitlines()[0])
    p.add_argument("run_id", help="the MLflow run id of a job")
    p.add_argument("--uri", help="tracking URI (default: as the pipeline)")
    args = p.parse_args(argv)
    uri = tracking.resolve_uri(args.uri)
    try:
        db = tracking.sqlite_path(uri)
        if db is not None and not db.is_file():
            raise VerifyError(f"no tracking store at {db} (tracking URI {uri})")
        if db is None and not uri.startswith(("http://", "https://")):
            raise VerifyError(f"tracking URI {uri!r}: allowed schemes are sqlite:/// and http(s)://")
        if db is None:
            try:
                tracking.check_store(uri)
            except Exception as e:
                raise VerifyError(str(e)) from None
        problems = verify(tracking.client(uri), args.run_id)
    except VerifyError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if problems:
        print(f"run {args.run_id}: NOT verified, {len(problems)} difference(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"run {args.run_id}: verified (pruned weights are zero, test accuracy matches {ACCURACY_METRIC})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
