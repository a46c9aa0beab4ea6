"""Every option of every group composes and validates; bad values stop with one line and exit 2."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, compose_config

from pipeline.config import ConfigError, validate

GROUPS = ["data", "model", "training", "method", "sparsity", "tracking"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group):
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert options
    for option in options:
        overrides = [f"{group}={option}"] + ([f"data.path=/x.{option}"] if option in ("npz", "folder") else [])
        cfg = compose_config(overrides)
        parts = validate(cfg)
        assert parts[group].name == option


def test_defaults_are_the_studys_setup():
    cfg = compose_config()
    assert (cfg.data.name, cfg.model.name, cfg.method.name, cfg.sparsity.name) == (
        "digits", "seed_cnn", "magnitude", "one_shot")
    parts = validate(cfg)
    assert parts["method"].scope == "global"
    assert 0 <= parts["sparsity"].target < 1


@pytest.mark.parametrize("override, needle", [
    ("sparsity.target=1.0", "sparsity.target=1.0"),
    ("sparsity.target=-0.1", "sparsity.target=-0.1"),
    ("training.baseline.epochs=-1", "training.baseline.epochs"),
    ("training.finetune.epochs=0", "training.finetune.epochs"),
    ("training.finetune.batch_size=0", "training.finetune.batch_size"),
    ("training.baseline.epochs=abc", "training.baseline.epochs"),
    ("+method.bogus=1", "method.bogus"),
    ("method.scope=everywhere", "method.scope"),
    ("model.filters=three", "model.filters"),
    ("seed=-3", "seed"),
    ("method._target_=os.system", "method._target_"),
    ("method._target_=pipeline.models.SeedCNN", "a subclass of pipeline.pruning.base.PruningMethod"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose_config([override]))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["sparsity.target=1.5"], "sparsity.target=1.5"),
    (["method=nope"], "method/nope"),
    (["training.baseline.epochs=-2"], "training.baseline.epochs"),
    (["training.baseline.epochs=ten"], "training.baseline.epochs"),
    (["-m", "method=magnitude,filter", "sparsity.target=0.5,1.2"], "sparsity.target=1.2"),
    (["model.padding=valid"], "does not fit images of shape (8, 8, 1)"),
    (["-m", "model.padding=same,valid"], "does not fit images of shape (8, 8, 1)"),
    (["-m", "hydra/launcher=workers", "model.padding=same,valid"], "does not fit images of shape (8, 8, 1)"),
    (["-m", "method=magnitude,nope"], "method/nope"),
    (["tracking.uri=file:./mlruns"], "file store is not supported"),
    (["tracking.uri=http://127.0.0.1:9"], "cannot reach the tracking server"),
])
def test_cli_rejects_bad_input_with_exit_2_and_writes_nothing(tmp_path, args, needle):
    uri = [] if any(a.startswith("tracking.uri") for a in args) else [f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args, *uri,
                           f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.db").exists()
    assert not list((tmp_path / "tmp").glob("pipeline-store-*"))  # a new store made aside (NewStore) is gone
