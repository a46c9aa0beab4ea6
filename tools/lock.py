"""Regenerate the lock files from pyproject.toml's ranges (`make lock`; see the Makefile).

    python tools/lock.py [--upgrade] --python 3.11 3.12 3.13 -- requirements.lock='*' requirements-peers.lock=peers

Each lock is a pip constraints file (`name==version`, one a line, sorted) holding every package,
direct or transitive, that `pip install '.[EXTRAS]'` installs, for each of the given Pythons:

    pip install -c requirements.lock -e '.[dev]'

`*` stands for every extra of pyproject.toml that no other lock names, so a new extra lands in
requirements.lock with a plain `make lock`. For each lock and each Python, pip resolves the project in a
throwaway venv (`pip install --dry-run --ignore-installed --report`: nothing is downloaded but
metadata, nothing is installed). A package whose version differs between the Pythons gets one line per
version with a `python_version` marker. tensorflow-cpu (Linux x86_64 only) gets its platform marker and,
where the lock has no tensorflow of its own, a `tensorflow` line of the same version for other platforms.

Without --upgrade the current lock file (if any) constrains the resolution, so only what pyproject.toml's
changes require moves (new packages are added, unused ones dropped); with --upgrade every package takes
the newest version its ranges allow. Resolved on this machine's platform (Linux x86_64): dependencies
that only another platform needs are not pinned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The same release published under two names: the key on Linux x86_64, the value elsewhere.
PLATFORM_TWINS = {"tensorflow-cpu": "tensorflow"}
LINUX_X86 = 'sys_platform == "linux" and platform_machine == "x86_64"'
NOT_LINUX_X86 = 'sys_platform != "linux" or platform_machine != "x86_64"'
SKIP = {"pip"}  # the project itself is skipped by name too


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_python(version: str) -> str:
    """The absolute path of python<version>; a pyenv version installed but not selected is found too."""
    code = "import sys; print(sys.executable)"
    exe = f"python{version}"
    attempts = [{}]
    if shutil.which("pyenv"):
        found = subprocess.run(["pyenv", "whence", exe], capture_output=True, text=True).stdout.split()
        attempts += [{"PYENV_VERSION": v} for v in reversed(found)]
    for extra in attempts:
        try:
            out = subprocess.run([exe, "-c", code], capture_output=True, text=True, env={**os.environ, **extra})
        except FileNotFoundError:
            break
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    sys.exit(f"lock: python{version} not found (every Python the lock covers must be installed)")


def resolve(python: str, version: str, extras: list[str], prior: Path | None, work: Path) -> dict[str, str]:
    """name -> version of everything `pip install '.[extras]'` would install on this Python."""
    venv = work / f"venv-{version}-{'+'.join(extras) or 'base'}"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True, stderr=subprocess.DEVNULL)
    report = venv / "report.json"
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), target]
    if prior is not None:
        cmd[4:4] = ["-c", str(prior)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        err = "\n".join(line for line in out.stderr.splitlines() if "is ignored: it is neither" not in line)
        hint = (
            f"\nlock: a pin of {prior.name} conflicts with pyproject.toml; `make lock UPGRADE=1` re-resolves everything"
            if prior is not None
            else ""
        )
        raise RuntimeError(f"pip could not resolve {target} on Python {version}:\n{err[-4000:]}{hint}")
    own = canonical(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    pins = {}
    for item in json.loads(report.read_text())["install"]:
        name = canonical(item["metadata"]["name"])
        if name not in SKIP and name != own:
            pins[name] = item["metadata"]["version"]
    return pins


def merge(per_python: dict[str, dict[str, str]]) -> list[str]:
    """One `name==version[ ; marker]` line per package and version, sorted by name."""
    versions = list(per_python)
    names = sorted({n for pins in per_python.values() for n in pins})
    lines = []
    for name in names:
        by_version: dict[str, list[str]] = {}
        for v in versions:
            if name in per_python[v]:
                by_version.setdefault(per_python[v][name], []).append(v)
        twin = PLATFORM_TWINS.get(name)
        for pinned, pys in by_version.items():
            markers = []
            if pys != versions:
                markers.append(" or ".join(f'python_version == "{v}"' for v in pys))
            if twin is not None:
                markers.append(LINUX_X86)
            lines.append(_line(name, pinned, markers))
            if twin is not None and not any(twin in per_python[v] for v in pys):
                lines.append(_line(twin, pinned, [*markers[:-1], NOT_LINUX_X86]))
    return sorted(lines, key=lambda line: line.split("==")[0])


def _line(name: str, version: str, markers: list[str]) -> str:
    if not markers:
        return f"{name}=={version}"
    if len(markers) == 1:
        return f"{name}=={version} ; {markers[0]}"
    return f"{name}=={version} ; " + " and ".join(f"({m})" for m in markers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", nargs="+", required=True, help="Python versions the locks cover, e.g. 3.11 3.12")
    ap.add_argument("--upgrade", action="store_true", help="ignore the current locks: newest versions in the ranges")
    ap.add_argument("--jobs", type=int, default=3, help="resolutions run at once (default 3)")
    ap.add_argument(
        "locks", nargs="+", metavar="FILE=EXTRAS", help="a lock file and its extras (comma-separated, * = the rest)"
    )
    args = ap.parse_args()

    declared = list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))
    specs = [(Path(f), [e for e in x.split(",") if e]) for f, _, x in (s.partition("=") for s in args.locks)]
    named = {e for _, extras in specs for e in extras if e != "*"}
    unknown = named - set(declared)
    if unknown:
        sys.exit(f"lock: no such extra in pyproject.toml: {', '.join(sorted(unknown))}")
    specs = [
        (f, sorted({e for x in extras for e in ([d for d in declared if d not in named] if x == "*" else [x])}))
        for f, extras in specs
    ]
    pythons = {v: find_python(v) for v in args.python}
    jobs = []
    with tempfile.TemporaryDirectory(prefix="lock-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for f, extras in specs:
            path = ROOT / f
            prior = path if path.exists() and not args.upgrade else None
            for v, exe in pythons.items():
                print(f"lock: resolving {f} (extras: {','.join(extras) or 'none'}) on Python {v}", flush=True)
                jobs.append((f, extras, v, pool.submit(resolve, exe, v, extras, prior, Path(tmp))))
        results: dict[Path, dict[str, dict[str, str]]] = {}
        failed = False
        for f, _, v, job in jobs:
            try:
                results.setdefault(f, {})[v] = job.result()
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"lock: {f} on Python {v}: {e}", file=sys.stderr)
                failed = True
    if failed:
        sys.exit(1)  # no lock is written unless every resolution succeeded
    for f, extras in specs:
        per_python = {v: results[f][v] for v in args.python}
        install = f"pip install -c {f} -e '.[{','.join(extras)}]'" if extras else f"pip install -c {f} -e ."
        header = [
            f"# Exact versions of all that `pip install '.[{','.join(extras)}]'` installs, direct and transitive,",
            f"# resolved from pyproject.toml's ranges for Python {', '.join(args.python)} on Linux x86_64.",
            "# Generated by `make lock` (tools/lock.py): do not edit by hand. A pip constraints file:",
            f"#   {install}",
            "# Other platforms take tensorflow for tensorflow-cpu; what only they need is not pinned here.",
            f"# python: {' '.join(args.python)}",
            f"# extras: {' '.join(extras)}",
        ]
        (ROOT / f).write_text("\n".join(header + merge(per_python)) + "\n")
        print(f"lock: wrote {f} ({len(set().union(*per_python.values()))} packages)")


if __name__ == "__main__":
    main()
