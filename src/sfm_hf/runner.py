"""Runs the configured stages in order; each stage reads its inputs from, and writes to, ``output_dir``.

The runner decides what a stage is for this run: the single-backbone stage, or for a joint run
(``backbone: [A, B]``) its orchestration over the members in :mod:`sfm_hf.multi`. It also merges a
``statistics_from`` list (:mod:`sfm_hf.merge`) before any stage reads statistics.

Before anything is written, the run takes a lock on ``output_dir`` and checks the inputs of the
stages it will not produce itself; only then is ``config.yaml`` written. When a stage changes
its outputs, the outputs of later stages made from the old ones are removed, so that nothing in
``output_dir`` disagrees with its inputs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from accelerate.logging import get_logger

from .config import Config
from .errors import RunInterrupted
from .hub import check_sources, statistics_dir
from .layout import (
    CHECKPOINTS_DIR, EVALUATION_DIR, FEATURES_DIR, IMAGES_FILE, MODEL_DIR, STATISTICS_DIR, STATISTICS_TENSORS,
    SYNTHETIC_DIR, RunLayout,
)
from .merge import merge_for_run
from .statistics import run_statistics
from .tracking import tracker_hparams
from .utils import OutputDirLock, file_digest, prepare_output_dir, share_from_main

logger = get_logger(__name__)

# The file whose change means a stage made new outputs, and what later stages built on the old ones.
STAGE_OUTPUT = {"statistics": f"{STATISTICS_DIR}/{STATISTICS_TENSORS}", "distill": f"{SYNTHETIC_DIR}/{IMAGES_FILE}"}
# Stages whose output lives in each member folder of a joint run (sfm_hf.multi), not in output_dir.
PER_MEMBER_STAGES = ("statistics",)
DEPENDENT_OUTPUTS = {
    "statistics": [CHECKPOINTS_DIR, SYNTHETIC_DIR, EVALUATION_DIR, MODEL_DIR],
    "distill": [EVALUATION_DIR, MODEL_DIR],
}
# Feature caches are keyed by what they were computed from, so they stay valid.
KEPT_INSIDE_DEPENDENTS = (FEATURES_DIR,)
# Every dataset has at least two classes (sfm_hf.data refuses fewer): the bound on Stage II's images before Stage I.
MIN_CLASSES = 2


def stage_functions(config: Config) -> dict[str, Callable]:
    """The function of each stage for this run: a joint run's Stage I and III go over every member."""
    from .distill import run_distill
    from .evaluation import run_evaluate
    from .export import run_export

    if config.is_joint:
        from .multi import run_joint_evaluate, run_joint_statistics

        return {"statistics": run_joint_statistics, "distill": run_distill, "evaluate": run_joint_evaluate,
                "export": run_export}
    return {"statistics": run_statistics, "distill": run_distill, "evaluate": run_evaluate, "export": run_export}


def run_folders(config: Config) -> list[Path]:
    """Every folder that holds outputs of this run: output_dir and, for a joint run, each member folder."""
    members = [Path(member.output_dir) for member in config.members()] if config.is_joint else []
    return [Path(config.output_dir), *members]


def check_inputs(config: Config, accelerator) -> None:
    """Refuse, before anything is written, a run whose existing inputs cannot serve the stages.

    Only the inputs of stages that this run does not produce itself are checked: the statistics (made from this
    run's dataset, split, backbone and preprocessing, with enough images per class) when 'statistics' is not among
    the stages, then the distillation checkpoint, or when 'distill' is not among them either, the synthetic images
    that evaluate and export read (made with this run's settings). Synthetic images that could not fit in memory
    are refused first, before Stage I.
    """
    from .distill.inputs import check_memory, check_resumable, check_synthetic_current, load_statistics
    from .statistics import check_ipc_fits, check_statistics_inputs

    stages = set(config.stages)
    if "distill" in stages and "statistics" in stages:
        check_memory(config, MIN_CLASSES, accelerator.device, accelerator.num_processes, at_least=True)
    if "statistics" in stages or not {"distill", "evaluate", "export"} & stages:
        return
    for member in config.members():
        statistics = load_statistics(member)
        check_statistics_inputs(member, statistics, statistics_dir(member))
        check_ipc_fits(member, statistics.class_counts, statistics.class_names)
    if "distill" in stages:
        check_memory(config, statistics.num_classes, accelerator.device, accelerator.num_processes)
        check_resumable(config, accelerator.num_processes)
    elif "export" in stages or ("evaluate" in stages and config.distill.method in config.evaluate.synthetic_train_sets):
        check_synthetic_current(config)


def _digest_or_none(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None


def stage_outputs(config: Config, stage: str) -> list[Path]:
    """The files whose change means ``stage`` made new outputs (a joint run's statistics: every member's)."""
    if stage not in STAGE_OUTPUT:
        return []
    folders = [Path(member.output_dir) for member in config.members()] if stage in PER_MEMBER_STAGES else [
        Path(config.output_dir)]
    return [folder / STAGE_OUTPUT[stage] for folder in folders]


def invalidate_dependents(output_dir: Path, stage: str) -> list[Path]:
    """Remove the outputs of later stages made from ``stage``'s previous outputs; returns what went."""
    removed = []
    for name in DEPENDENT_OUTPUTS[stage]:
        path = output_dir / name
        if not path.exists():
            continue
        entries = [path] if path.is_file() else [p for p in path.iterdir() if p.name not in KEPT_INSIDE_DEPENDENTS]
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        removed.append(path)
    return removed


def run_stages(config: Config, accelerator) -> dict[str, float]:
    """Run ``config.stages`` in order and return the seconds each took."""
    from accelerate.utils import set_seed

    available = stage_functions(config)
    missing = [stage for stage in config.stages if stage not in available]
    if missing:
        raise NotImplementedError(f"Stage(s) {missing} are not available in this version of sfm-hf.")
    # A missing, gated or unreachable Hub repo fails here in a second, not after minutes of retries.
    check_sources(config)
    output_dir = Path(config.output_dir)
    lock = OutputDirLock(output_dir)

    def prepare() -> None:
        prepare_output_dir(output_dir)
        lock.acquire()
        try:
            if isinstance(config.statistics_from, list) and {"distill", "evaluate", "export"} & set(config.stages):
                merge_for_run(config)
            check_inputs(config, accelerator)
            config.save(RunLayout(output_dir).config_file)
        except BaseException:
            lock.release()
            raise

    share_from_main(accelerator, prepare)
    try:
        return _run_in_order(config, accelerator, available, set_seed)
    finally:
        lock.release()


def interrupted_message(config: Config, stage: str, finished: list[str]) -> str:
    """What an interrupted run kept and the command line that goes on from the interrupted stage."""
    from .distill.checkpoints import checkpoint_step

    kept = [f"the outputs of {', '.join(finished)}"] if finished else []
    step = checkpoint_step(RunLayout(config.output_dir).checkpoint(0)) if stage == "distill" else None
    if step is not None:
        kept.append(f"Stage II's checkpoint of step {step} in {RunLayout(config.output_dir).checkpoints_dir}")
    elif stage == "distill":
        kept.append(f"no Stage II checkpoint yet (one every distill.checkpoint_every = {config.distill.checkpoint_every} "
                    "steps)")
    remaining = config.stages[config.stages.index(stage):]
    resumes = " (distillation resumes from its checkpoint)" if step is not None else ""
    return (f"interrupted during stage '{stage}'. Kept: {'; '.join(kept) or 'nothing new'}. To go on, run the same "
            f"command with --stages {','.join(remaining)}{resumes}.")


def _run_in_order(config: Config, accelerator, available: dict[str, Callable], set_seed) -> dict[str, float]:
    output_dir = Path(config.output_dir)
    if accelerator.log_with:  # `trackers` fills only once init_trackers has run
        accelerator.init_trackers(config.tracker_project, config=tracker_hparams(config.to_dict()))
    timings = {}
    for stage in config.stages:
        set_seed(config.seed)
        outputs = stage_outputs(config, stage) if accelerator.is_main_process else []
        before = [_digest_or_none(output) for output in outputs]
        start = time.perf_counter()
        try:
            available[stage](config, accelerator)
        except KeyboardInterrupt:
            raise RunInterrupted(interrupted_message(config, stage, list(timings))) from None
        timings[stage] = time.perf_counter() - start
        if [_digest_or_none(output) for output in outputs] != before:
            # A joint set and its evaluations on every member were built on all members' statistics.
            removed = [path for folder in run_folders(config) for path in invalidate_dependents(folder, stage)]
            if removed:
                logger.info(f"Stage {stage} made new outputs; removed what was built on the old ones: "
                            f"{', '.join(str(path) for path in removed)}.")
        accelerator.wait_for_everyone()
    summary = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
    logger.info(f"Done ({summary}). Outputs in {output_dir.resolve()}")
    return timings

