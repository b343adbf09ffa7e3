"""Training checkpoints on local disk: written atomically, the last K kept, the newest found on resume.

Layout `<dir>/step_00001000.pt` with the Trainer's state (official key layout under "state_dict" and
"state_dict_ema", so the reference code and `models.pixart_checkpoint.load_pixart` read it), plus the
model's constructor config, the training config and the data loader's position.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

PATTERN = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` for `step` (temporary name, then rename) and delete all but the newest `keep_last`."""
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of a crashed save are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
