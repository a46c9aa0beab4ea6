"""The install set-up: pyproject.toml's ranges, the lock files and the Makefile agree.

No network and no venv is made here: `make lock` and `make install` do those (see the Makefile).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = {"requirements.lock": None, "requirements-peers.lock": ["peers"]}  # None: every extra but peers
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"},
    "macos-arm64": {"sys_platform": "darwin", "platform_machine": "arm64", "platform_system": "Darwin"},
}
BOOTSTRAP = {"pip", "setuptools", "wheel"}  # seeded by venv itself, whatever the lock says


def _makefile_pythons() -> list[str]:
    m = re.search(r"^PYTHONS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile: no PYTHONS := line"
    return m.group(1).split()


def _header(path: Path, key: str) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"{path.name}: no '# {key}:' line (regenerate it with `make lock`)")


def _pins(path: Path) -> list[Requirement]:
    reqs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}:{n}: not an exact pin: {line}"
        assert not req.extras and req.url is None, f"{path.name}:{n}: pip constraints take no extras or URLs: {line}"
        reqs.append(req)
    return reqs


def _env(python: str, platform: str) -> dict[str, str]:
    return {
        **default_environment(),
        **PLATFORMS[platform],
        "python_version": python,
        "python_full_version": f"{python}.0",
    }


def _pinned(reqs: list[Requirement], env: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for req in reqs:
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in out, f"{name} pinned twice for {env['python_version']} {env['sys_platform']}"
            out[name] = next(iter(req.specifier)).version
    return out


def _extras(lock: str) -> list[str]:
    declared = list(PYPROJECT["project"].get("optional-dependencies", {}))
    named = {e for extras in LOCKS.values() if extras for e in extras}
    return sorted(LOCKS[lock] or [e for e in declared if e not in named])


def test_pythons_agree():
    """requires-python, the Makefile's PYTHONS and the Pythons each lock was resolved for are one set."""
    pythons = _makefile_pythons()
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for minor in range(8, 20):
        v = f"3.{minor}"
        assert (f"{v}.0" in spec) == (v in pythons), f"requires-python {spec} vs Makefile PYTHONS {pythons} at {v}"
    for lock in LOCKS:
        assert _header(ROOT / lock, "python") == pythons, f"{lock} was resolved for other Pythons: `make lock`"


@pytest.mark.parametrize("lock", list(LOCKS))
def test_lock_covers_pyproject(lock):
    """Every requirement of the project and of the lock's extras is pinned, within its range, on every
    Python and platform: a range or an extra changed in pyproject.toml without `make lock` fails here."""
    path = ROOT / lock
    extras = _extras(lock)
    assert _header(path, "extras") == extras, (
        f"{lock} locks extras {_header(path, 'extras')}, not {extras}: `make lock`"
    )
    reqs = _pins(path)
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
    for python in _makefile_pythons():
        for platform in PLATFORMS:
            env = _env(python, platform)
            pins = _pinned(reqs, env)
            for req in wanted:
                if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                    continue
                name = canonicalize_name(req.name)
                assert name in pins, f"{lock}: {req.name} is not pinned for Python {python} on {platform}: `make lock`"
                assert pins[name] in req.specifier, (
                    f"{lock}: {name}=={pins[name]} is outside pyproject.toml's {req} (Python {python}): `make lock`"
                )


def test_installed_versions_are_the_locked_ones():
    """This venv was installed from requirements.lock (`make install`), not from the ranges alone."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv")
    env = {**default_environment()}
    pins = _pinned(_pins(ROOT / "requirements.lock"), env)
    differ = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and name not in BOOTSTRAP and dist.version != pins[name]:
            differ.append(f"{name} {dist.version} (lock: {pins[name]})")
    assert not differ, "installed versions differ from requirements.lock (run `make install`): " + ", ".join(differ)


def test_make_refuses_another_python(tmp_path):
    """A Python outside PYTHONS stops make with one line naming it, before any venv is made."""
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\necho /usr/bin/python3.9 3.9.18\n")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    out = subprocess.run(
        ["make", "--no-print-directory", "install", f"PYTHON={fake}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")},
    )
    assert out.returncode == 2, out.stderr
    assert f"is Python 3.9.18; this project needs Python {' '.join(_makefile_pythons())}" in out.stderr
    assert not venv.exists()
