"""One place for every artefact Astra caches on disk: trained small models, codebooks,
converted weights. All live under :func:`cache_dir`, keyed by a hash of what made them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


def cache_dir() -> Path:
    """Where trained weights and codebooks are cached (``$ASTRA_CACHE`` or ``~/.cache/astra``)."""
    return Path(os.environ.get("ASTRA_CACHE", Path.home() / ".cache" / "astra"))


def spec_hash(spec: Any, digits: int = 16) -> str:
    """Short sha256 of a JSON-able description (sorted keys; other values by ``str``)."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:digits]


def cache_path(kind: str, name: str, spec: Any = None, *, suffix: str = "",
               digits: int = 16) -> Path:
    """``<cache>/<kind>/<name>[-<hash of spec>]<suffix>``."""
    stem = name if spec is None else f"{name}-{spec_hash(spec, digits)}"
    return cache_dir() / kind / f"{stem}{suffix}"


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(os.fspath(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
