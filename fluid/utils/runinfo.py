"""What every run records beside its outputs: git revision, metrics, resolved config; and which
process of a multi-device run records it (:func:`rank_zero`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping


def rank_zero(trainer) -> bool:
    """Whether this process is global rank 0 (the one that writes a run's files): the trainer's
    answer, or before there is one, the launcher's ``RANK``/``LOCAL_RANK``."""
    if trainer is not None:
        return trainer.is_global_zero
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def git_revision(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": rev, "dirty": bool(status) if status is not None else None}


def to_plain(value: Any) -> Any:
    """Turn tensors / numpy scalars into JSON numbers; non-finite floats become None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: to_plain(v) for k, v in data.items()}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One JSON object a line (a run's predictions or samples)."""
    path = Path(path)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
