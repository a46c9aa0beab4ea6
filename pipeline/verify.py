"""Check a finished run against its own artifacts: python -m pipeline.verify <run_id> [--uri URI]

What is checked, each difference reported on its own line:
- checksums: every artifact named in the tag `artifacts.sha256` (recorded when the run logged it) is
  there with that sha256, and the artifacts read below are among them;
- masks (`masks.npz`): every weight a mask prunes is exactly zero in `model/model.keras`; the masks
  name exactly the weights the run's method prunes and prune as many entries as the method does at the
  run's target (method, schedule and seed rebuilt from the run's `config.yaml`, applied to the model);
- the weight metrics, recomputed with the pipeline's own functions (relative tolerance 1e-6): from
  `model/model.keras` eval/sparsity, conv_sparsity, model_sparsity, params_total, params_nonzero,
  compression, flops_dense, flops_effective, speedup_theoretical and every layer/<name>/sparsity; from
  the final model (`model/shrunk.keras` where structured pruning logged one, else `model/model.keras`)
  eval/size_gzip_bytes; from `model/shrunk.keras` eval/flops_shrunk and eval/params_shrunk;
- the data rebuilt from `config.yaml` has the run's tag data_digest (data=folder files may have changed);
- test accuracy, on the test data rebuilt from `config.yaml` (tolerance 1e-4): `model/model.keras`
  against eval/masked_accuracy (runs that predate it: skipped with a note), the final model against
  eval/accuracy;
- the run is FINISHED.
An artifact that cannot be read (corrupt, truncated) is a difference too, never a crash. The run's tag
`verified` is set to "false" when checking starts and to "true" only if nothing differs; a store that
refuses the tag (read-only) gets one warning line.

Exit status: 0 when everything holds, 1 when something differs (each difference on its own line),
2 when the run or the tracking store cannot be found (one line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.tracking import CHECKSUMS_TAG, writable

ACCURACY_TOLERANCE = 1e-4
METRIC_RTOL = 1e-6
ACCURACY_METRIC = "eval/accuracy"
MASKED_ACCURACY_METRIC = "eval/masked_accuracy"
MODEL, SHRUNK, MASKS, CONFIG = "model/model.keras", "model/shrunk.keras", "masks.npz", "config.yaml"
SHRUNK_METRICS = ("eval/flops_shrunk", "eval/params_shrunk")


class VerifyError(Exception):
    """The run cannot be verified at all (unknown run, unreachable store): exit status 2."""


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _download(client, run_id: str, path: str, dst: Path) -> Path | None:
    """The artifact's local path, or None if the run has no such artifact."""
    folder, _, name = path.rpartition("/")
    listed = {Path(f.path).name for f in client.list_artifacts(run_id, folder or None)}
    if name not in listed:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksum_problems(recorded: dict[str, str] | None, files: dict[str, Path | None]) -> list[str]:
    """Every recorded artifact is there with its recorded sha256; every artifact verify reads is recorded."""
    if recorded is None:
        return [f"tag {CHECKSUMS_TAG} is missing: the artifacts' checksums were not recorded when they were logged"]
    problems = []
    for name, digest in sorted(recorded.items()):
        if files.get(name) is None:
            problems.append(f"artifact {name} is missing (its sha256 was recorded when it was logged)")
        elif sha256(files[name]) != digest:
            problems.append(f"artifact {name}: sha256 differs from the one recorded when it was logged")
    for name, path in sorted(files.items()):
        if path is not None and name not in recorded:
            problems.append(f"artifact {name} has no sha256 in the tag {CHECKSUMS_TAG}")
    return problems


def mask_problems(model, masks: dict[str, np.ndarray]) -> list[str]:
    """Every weight whose mask is False must be exactly zero."""
    from pipeline.pruning.masks import variables_by_path

    variables = variables_by_path(model)
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


def _pruned(masks: dict[str, np.ndarray]) -> int:
    return sum(int((~np.asarray(m, bool)).sum()) for m in masks.values())


def coverage_problems(model, masks: dict[str, np.ndarray], conf) -> list[str]:
    """masks.npz names the weights the run's method prunes and prunes as many entries as it does."""
    from pipeline.config import build

    method, schedule = build("method", conf.method), build("sparsity", conf.sparsity)
    method.bind(build("data", conf.data).load(int(conf.seed)))  # as the run did (taylor scores on data)
    # Recomputed on the final model, the method picks the same masks as the run's last update: the
    # weights it pruned are exactly zero (mask_problems checks it), so they are the smallest by every
    # method's score (|w|, a filter's L1 norm, a channel's |gamma| or kernel norm) and are picked again,
    # or as many of them when other weights are exactly zero too (ties go by position); random masks
    # depend only on the seed. Which weights have masks depends on the model and method only.
    expected = method.masks(model, schedule.target, int(conf.seed))
    where = f"{method.name} at sparsity.target={schedule.target} on {MODEL}"
    missing, extra = sorted(set(expected) - set(masks)), sorted(set(masks) - set(expected))
    problems = []
    if missing:
        problems.append(f"masks.npz has no mask for {len(missing)} weight(s) that {where} prunes: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"masks.npz has masks for {len(extra)} weight(s) that {where} does not prune: "
                        f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if not problems and _pruned(masks) != _pruned(expected):
        problems.append(f"masks.npz prunes {_pruned(masks)} entries; {where} prunes {_pruned(expected)}")
    return problems


def recomputed_metrics(model, shrunk=None) -> dict[str, float]:
    """The logged metrics the weights determine, by the functions the run computed them with."""
    from pipeline.pruning import accounting
    from pipeline.stages.evaluate import weight_metrics

    return {f"eval/{k}": v for k, v in weight_metrics(model, shrunk).items()} | accounting.layer_sparsity(model)


def metric_problems(logged: dict[str, float], recomputed: dict[str, float]) -> list[str]:
    """Each recomputed metric must be logged with the same value; no layer/ metric may name another layer."""
    problems = []
    for name, value in sorted(recomputed.items()):
        if name not in logged:
            problems.append(f"{name}: not logged (recomputed {value:.10g} from the artifacts)")
        elif not math.isclose(logged[name], value, rel_tol=METRIC_RTOL):
            problems.append(f"{name}: logged {logged[name]:.10g}, recomputed {value:.10g} from the artifacts")
    for name in sorted(logged):
        if name.startswith("layer/") and name.endswith("/sparsity") and name not in recomputed:
            problems.append(f"{name}: logged, but {MODEL} has no such conv or dense layer")
    return problems


def accuracy_problems(logged: dict[str, float], model, shrunk, data, report) -> list[str]:
    """The test accuracy of each logged model, re-evaluated, against the metric logged for it."""
    from pipeline.stages.evaluate import test_metrics

    final = (SHRUNK, shrunk) if shrunk is not None else (MODEL, model)
    checks = [(MASKED_ACCURACY_METRIC, MODEL, model), (ACCURACY_METRIC, *final)]
    problems, accuracy = [], {}
    for metric, name, m in checks:
        if metric not in logged:
            if metric == MASKED_ACCURACY_METRIC:
                report(f"note: no metric {metric} (a run from before it was logged): {MODEL}'s accuracy "
                       "is checked only where it is the final model")
            else:
                problems.append(f"no metric {metric} was logged")
            continue
        if name not in accuracy:
            accuracy[name] = test_metrics(m, data)["accuracy"]
        report(f"accuracy: logged {metric} = {logged[metric]:.6f}, re-evaluated ({name}) = {accuracy[name]:.6f}")
        if abs(accuracy[name] - logged[metric]) > ACCURACY_TOLERANCE:
            problems.append(f"{metric}: logged {logged[metric]:.6f}, re-evaluated {accuracy[name]:.6f} "
                            f"from {name} (tolerance {ACCURACY_TOLERANCE:g})")
    return problems


def _job_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise VerifyError(f"no run {run_id!r} in {client.tracking_uri}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a store that cannot be read
        raise VerifyError(f"run {run_id!r} cannot be read from {client.tracking_uri}: {_one_line(e)}") from None
    if "config_hash" not in run.data.tags:
        kind = run.data.tags.get("kind", "unknown")
        raise VerifyError(f"run {run_id} is not a job's run (kind={kind}): only job runs can be verified")
    return run


def _set_verified(client, run_id: str, verified: bool) -> bool:
    """Tag the run; False, after one warning line, if the store refuses (e.g. read-only)."""
    try:
        client.set_tag(run_id, "verified", str(verified).lower())
        return True
    except Exception as e:
        print(f"warning: cannot set the tag verified on run {run_id}: {_one_line(e)}", file=sys.stderr)
        return False


def verify(client, run_id: str, tag: bool = True, report=print) -> list[str]:
    """What differs between the run's logged results and its artifacts ([] = all holds).
    Raises VerifyError if the run does not exist. Sets the tag `verified` unless tag=False."""
    run = _job_run(client, run_id)
    if tag and not writable(client.tracking_uri):
        print("note: the tracking store is read-only here: the tag verified is not set", file=sys.stderr)
        tag = False
    tagging = tag and _set_verified(client, run_id, False)  # a crash below never leaves an old "true"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            problems = _check(client, run, Path(tmp), report)
        except Exception as e:  # a store that fails mid-way: still one line, never a traceback
            problems = [f"verification stopped: {_one_line(e)}"]
    if tagging and not problems:
        _set_verified(client, run_id, True)
    return problems


def _check(client, run, tmp: Path, report) -> list[str]:
    problems: list[str] = []

    def attempt(what: str, fn, *args):
        """fn(*args), or None with a problem line naming `what` if it raises."""
        try:
            return fn(*args)
        except Exception as e:
            problems.append(f"{what}: {_one_line(e)}")
            return None

    run_id, logged = run.info.run_id, run.data.metrics
    if run.info.status != "FINISHED":
        problems.append(f"run status is {run.info.status}, not FINISHED")
    tag = run.data.tags.get(CHECKSUMS_TAG)
    recorded = attempt(f"tag {CHECKSUMS_TAG} cannot be read", _checksums, tag) if tag is not None else None
    files = {name: attempt(f"artifact {name} cannot be downloaded", _download, client, run_id, name, tmp)
             for name in sorted({MODEL, SHRUNK, MASKS, CONFIG} | set(recorded or {}))}
    if tag is None or recorded is not None:
        problems += checksum_problems(recorded, files)
    for name in (MODEL, MASKS, CONFIG):
        if files[name] is None and name not in (recorded or {}):
            problems.append(f"artifact {name} is missing")

    import keras
    from omegaconf import OmegaConf

    import pipeline.models  # noqa: F401  (registers the custom layers, if any, for safe loading)
    from pipeline.config import build
    from pipeline.pruning.masks import load_masks

    def load(name: str, loader):
        return attempt(f"artifact {name} cannot be read", loader, files[name]) if files[name] else None

    def keras_model(path):
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    conf = load(CONFIG, lambda path: OmegaConf.create(path.read_text()))
    if conf is not None:  # the run's model may need its imports, or allow Lambda code (model.safe_mode=false)
        attempt("the run's model config is not valid", lambda: build("model", conf.model).prepare_loading())
    model, shrunk = load(MODEL, keras_model), load(SHRUNK, keras_model)
    masks = load(MASKS, load_masks)

    if model is not None and masks is not None:
        problems += attempt("masks.npz cannot be checked against the model", mask_problems, model, masks) or []
        report(f"masks: {len(masks)} pruned weights checked, {_pruned(masks)} entries must be zero")
        if conf is not None:
            problems += attempt("masks.npz cannot be compared with the run's method", coverage_problems,
                                model, masks, conf) or []
    if model is not None:
        recomputed = attempt("the metrics cannot be recomputed", recomputed_metrics, model, shrunk)
        if recomputed is not None:
            if files[SHRUNK] is not None and shrunk is None:  # the final model is unreadable: not its size
                recomputed.pop("eval/size_gzip_bytes")
            found = metric_problems(logged, recomputed)
            report(f"metrics: {len(recomputed)} recomputed from the artifacts, {len(found)} differ")
            problems += found
    if files[SHRUNK] is None:
        problems += [f"{name}: logged, but the run has no {SHRUNK}" for name in SHRUNK_METRICS if name in logged]
    if model is not None and conf is not None and (shrunk is not None or files[SHRUNK] is None):
        data = attempt("the run's test data cannot be rebuilt from config.yaml",
                       lambda: build("data", conf.data).load(int(conf.seed)))
        if data is not None:
            logged_digest = run.data.tags.get("data_digest")
            if logged_digest and data.digest != logged_digest:  # e.g. a data=folder whose files changed
                problems.append(f"data: the data rebuilt from config.yaml has digest {data.digest}, the run's "
                                f"data_digest is {logged_digest}: it changed since the run")
            problems += attempt("the test accuracy cannot be re-evaluated", accuracy_problems,
                                logged, model, shrunk, data, report) or []
    return problems


def _checksums(text: str) -> dict[str, str]:
    recorded = json.loads(text)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ValueError(f"not a JSON object {{artifact path: sha256 hex}}: {text[:80]!r}")
    return recorded


def main(argv: list[str] | None = None) -> int:
    from pipeline import tracking
    from pipeline.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.splitlines()[0])
    p.add_argument("run_id", help="the MLflow run id of a job")
    p.add_argument("--uri", help="tracking URI (default: as the pipeline)")
    args = p.parse_args(argv)
    try:
        problems = verify(tracking.existing_client(tracking.resolve_uri(args.uri)), args.run_id)
    except (VerifyError, ConfigError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if problems:
        print(f"run {args.run_id}: NOT verified, {len(problems)} difference(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"run {args.run_id}: verified (checksums, masks, recomputed metrics and test accuracy match)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
