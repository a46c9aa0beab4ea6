"""The pipeline's own files: where it keeps them (the user's cache), and how it writes one whole."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The pipeline's folder in the user's cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"


@contextlib.contextmanager
def replaced(path: Path):
    """A path beside `path` to write meanwhile: put in place whole once the block ends well, else removed. No
    reader (another process) ever sees half a file."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield part
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
