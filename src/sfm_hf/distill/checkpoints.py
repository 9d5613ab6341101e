"""Checkpoints of Stage II: pyramid levels, optimiser state, step, RNG states; one file per process."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import UserError, describe_error
from ..statistics import Statistics
from ..utils import atomic_path


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that was made from other inputs or settings than this run's."""


def checkpoint_fingerprint(config: Config, statistics: list[Statistics], world_size: int) -> dict:
    """The inputs and settings a checkpoint is only valid for (iterations may grow; logging may change).

    ``statistics``: those of every distillation backbone, in the order of ``config.backbones``; a joint
    set records each member's digest by backbone, so that a change in any of them is seen.
    """
    options = {f"distill.{key}": value for key, value in asdict(config.distill).items()}
    # Other views make other images: a resume must keep Stage II's flip and crop.
    options.update({f"augment.{key}": value for key, value in asdict(config.augment).items()})
    for free in ("iterations", "checkpoint_every", "preview_every", "log_every", "snapshot_every", "compile",
                 "checkpoint_chunk"):
        options.pop(f"distill.{free}")
    if config.distill.init != "centroids_noise":  # the blend weight changes no other start
        options.pop("distill.init_noise")
    digests = [member.digest for member in statistics]
    return {**options, "ipc": config.ipc, "seed": config.seed, "backbone": config.backbone,
            "statistics.non_target": config.statistics.non_target, "world_size": world_size,
            "statistics": dict(zip(config.backbones, digests)) if config.is_joint else digests[0],
            "dataset": config.dataset, "dataset_config": config.dataset_config, "train_split": config.train_split}


def synthetic_inputs(config: Config, statistics: list[Statistics]) -> dict:
    """What the synthetic images are a function of: the checkpoint's inputs and the number of steps.

    The number of processes is left out: 1 and N processes make the same images.
    """
    inputs = checkpoint_fingerprint(config, statistics, world_size=1)
    inputs.pop("world_size")
    return {**inputs, "distill.iterations": config.distill.iterations}


def _rng_state() -> dict:
    """Every RNG state as tensors and plain lists, so that the checkpoint loads with ``weights_only=True``."""
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss,
                  numpy_gauss],
        "python": [python_version, list(python_internal), python_gauss],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state((numpy_name, numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss,
                         numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))


def save_checkpoint(path: Path, images, optimizer, step: int, fingerprint: dict, *, loss: float,
                    seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "levels": [level.detach().cpu() for level in images.levels],
        "optimizer": optimizer.state_dict(),
        "fingerprint": fingerprint,
        "rng": _rng_state(),
        # Kept so that a resumed run reports its whole time and a finished one its last loss.
        "loss": loss,
        "seconds": seconds,
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def changed_settings(recorded: dict, expected: dict, unresolved: tuple[str, ...] = ()) -> list[str]:
    """The keys (settings and inputs) whose recorded value is not the expected one, ``unresolved`` ones not compared."""
    return sorted(
        key for key in set(recorded) | set(expected) if key not in unresolved and recorded.get(key) != expected.get(key)
    )


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, or None when there is none (or it cannot be read)."""
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 -- only asked to report what was kept; read_checkpoint says what is wrong
        return None


CHECKPOINT_KEYS = ("step", "levels", "optimizer", "fingerprint", "rng", "loss", "seconds")


def read_checkpoint(path: Path, fingerprint: dict, unresolved: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at ``path`` when it belongs to this run (``unresolved`` keys not compared), None when
    there is none.

    Loaded with ``weights_only=True``: a checkpoint holds tensors and plain values only, so a
    crafted file cannot run code. Unreadable files and other runs' checkpoints raise
    :class:`CheckpointError` naming the file and what to do.
    """
    if not path.is_file():
        return None
    start_over = f"Delete {path.parent} to start distillation over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- truncated, empty, garbage or unsafe: all mean "not ours"
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({describe_error(error)}): it is truncated, empty or not a checkpoint "
            f"of this version of sfm-hf. {start_over}."
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"Checkpoint {path} is not a checkpoint of this version of sfm-hf. {start_over}.")
    changed = changed_settings(state["fingerprint"], fingerprint, unresolved)
    if changed:
        raise CheckpointError(
            f"The checkpoint in {path.parent} belongs to a run with different settings or inputs "
            f"({', '.join(changed)}). Use a new output_dir, or delete that folder to start over."
        )
    return state

