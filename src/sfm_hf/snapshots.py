"""Snapshots of Stage II: the synthetic images every ``distill.snapshot_every`` steps, for time-to-quality curves.

::

    synthetic/snapshots/
      index.json                  {"snapshots": [{"step": 0, "seconds": 0.0, "file": "step-00000.safetensors"}, ...]}
      step-SSSSS.safetensors      images [N, 3, R, R] float32 in [0, 1], labels [N]

``seconds`` is the wall-clock time of distillation up to that step (a resumed run's earlier runs included), the
time spent writing snapshots left out, so the last entry's seconds are synthetic.json's. Snapshots stay local:
export and the Hub upload skip the folder (:data:`sfm_hf.export.publish.SYNTHETIC_LOCAL_ONLY`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from .errors import StageInputError
from .utils import load_tensors, save_tensors_atomically, write_text_atomically

SNAPSHOTS_DIR = "snapshots"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Snapshot:
    step: int
    seconds: float
    path: Path

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float [N, 3, R, R], labels long [N])."""
        return read_images(self.path)


def read_images(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, 3, R, R], labels long [N]) of a file of Stage II: images.safetensors or a snapshot."""
    tensors = load_tensors(path, "a file of synthetic images", "delete it and run the 'distill' stage again",
                           keys=("images", "labels"))
    return tensors["images"].float(), tensors["labels"].long()


def snapshots_dir(synthetic_dir: Path) -> Path:
    return Path(synthetic_dir) / SNAPSHOTS_DIR


def _read_index(folder: Path) -> list[dict]:
    path = folder / INDEX_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["snapshots"]
    except (ValueError, KeyError, TypeError) as error:
        raise StageInputError(f"{path} is not a snapshot index ({error}); delete {folder} to drop it.") from None


def _write_index(folder: Path, entries: list[dict]) -> None:
    write_text_atomically(folder / INDEX_FILE, json.dumps({"snapshots": entries}, indent=2))


def keep_snapshots_until(synthetic_dir: Path, step: int) -> None:
    """Drop the snapshots after ``step`` (a run resumed there makes them again); ``step`` 0 drops them all."""
    folder = snapshots_dir(synthetic_dir)
    if step == 0:
        shutil.rmtree(folder, ignore_errors=True)
        return
    entries = _read_index(folder)
    kept = [entry for entry in entries if entry["step"] <= step]
    for entry in entries:
        if entry["step"] > step:
            (folder / entry["file"]).unlink(missing_ok=True)
    if kept != entries:
        _write_index(folder, kept)


def write_snapshot(synthetic_dir: Path, step: int, seconds: float, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Save the images after ``step`` steps and add (or replace) their entry in the index."""
    folder = snapshots_dir(synthetic_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:05d}.safetensors"
    save_tensors_atomically({"images": images.float().contiguous(), "labels": labels.long().contiguous()},
                            folder / name)
    entries = [entry for entry in _read_index(folder) if entry["step"] != step]
    entries.append({"step": step, "seconds": round(seconds, 3), "file": name})
    _write_index(folder, sorted(entries, key=lambda entry: entry["step"]))


def read_snapshots(synthetic_dir: Path) -> list[Snapshot]:
    """The snapshots of a synthetic folder in step order; empty when it has none."""
    folder = snapshots_dir(synthetic_dir)
    return [Snapshot(int(entry["step"]), float(entry["seconds"]), folder / entry["file"])
            for entry in _read_index(folder)]
