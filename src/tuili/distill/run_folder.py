"""A distillation run's folder: its logs and its checkpoints.

`log.csv` and `log.jsonl` get one row per optimizer step; `checkpoints/step-NNNNNN/state.pt` is
written under a temporary name and then renamed, so an interrupted save never leaves a half
checkpoint to resume from, and only the newest few are kept.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tuili.distill.config import LOG_FIELDS


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        """Add one step's row to both logs."""
        self.path.mkdir(parents=True, exist_ok=True)
        new = not (self.path / "log.csv").exists()
        with open(self.path / "log.csv", "a", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """The logs with exactly these rows (after a resume: the steps up to the checkpoint)."""
        for name in ("log.csv", "log.jsonl"):
            (self.path / name).unlink(missing_ok=True)
        for row in rows:
            self.append(row)

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Write checkpoints/step-NNNNNN (temporary name, then rename); keep the newest `keep`."""
        folder = self.path / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"step-{step:06d}"
        tmp = folder / f".step-{step:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            torch.save(state, tmp / "state.pt")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or None."""
        checkpoints = sorted((self.path / "checkpoints").glob("step-*"))
        return checkpoints[-1] if checkpoints else None
