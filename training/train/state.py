"""Training checkpoints: atomic writes, readable errors, and the resume fingerprint check."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import torch

CHECKPOINT_FORMAT = 1


class ResumeError(ValueError):
    """A stage checkpoint cannot be resumed: other config, other stage, or unreadable."""


def save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary sibling, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict:
    """A checkpoint written by `save_state`; ResumeError naming the file when unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ResumeError(f"cannot read training checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def check_fingerprint(path: Path, found: dict, expected: dict) -> None:
    """Raise ResumeError listing every setting that differs between a checkpoint and this run."""
    keys = sorted(set(found) | set(expected))
    diff = [
        f"{k}: checkpoint {found.get(k, '<absent>')!r}, now {expected.get(k, '<absent>')!r}"
        for k in keys
        if found.get(k) != expected.get(k)
    ]
    if diff:
        raise ResumeError(
            f"cannot resume from {path}: its config does not match this run's "
            f"({'; '.join(diff)}); start a new --out folder or use the original settings"
        )


def flat_fingerprint(**parts) -> dict:
    """A flat JSON-comparable dict: nested dicts joined with dots, tuples as lists."""
    flat: dict = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = json.loads(json.dumps(value))

    visit("", parts)
    return flat


def load_final(path: Path, what: str, wait_s: float = 0.0) -> dict:
    """The finished checkpoint of an earlier stage (its trained weights), or a clear error.

    `wait_s` > 0 polls that long for the file to appear finished (a stage trained concurrently
    by another process of the same run).
    """
    deadline = time.time() + wait_s
    while wait_s > 0 and time.time() < deadline:
        if path.is_file() and load_state(path).get("done"):
            break
        time.sleep(10)
    if not path.is_file():
        raise FileNotFoundError(f"{what} needs {path}; train that stage first (--stages)")
    state = load_state(path)
    if not state.get("done"):
        raise ResumeError(f"{path} is unfinished (step {state['step']}); resume that stage first")
    return state
