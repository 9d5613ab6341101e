"""Runs the configured stages in order; each stage reads its inputs from, and writes to, ``output_dir``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .config import Config
from .hub import check_sources
from .statistics import run_statistics

logger = logging.getLogger(__name__)


def stage_functions() -> dict[str, Callable]:
    from .distill import run_distill
    from .evaluate import run_evaluate
    from .export import run_export

    return {"statistics": run_statistics, "distill": run_distill, "evaluate": run_evaluate, "export": run_export}


def run_stages(config: Config, accelerator) -> dict[str, float]:
    """Run ``config.stages`` in order and return the seconds each took."""
    from accelerate.utils import set_seed

    available = stage_functions()
    missing = [stage for stage in config.stages if stage not in available]
    if missing:
        raise NotImplementedError(f"Stage(s) {missing} are not available in this version of sfm-hf.")
    # A missing, gated or unreachable Hub repo fails here in a second, not after minutes of retries.
    check_sources(config)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if accelerator.trackers:
        scalars = {key: value for key, value in _flatten(config.to_dict()).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("sfm-hf", config=scalars)
    timings = {}
    for stage in config.stages:
        set_seed(config.seed)
        start = time.perf_counter()
        available[stage](config, accelerator)
        timings[stage] = time.perf_counter() - start
    if accelerator.is_main_process:
        summary = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
        print(f"Done ({summary}). Outputs in {output_dir.resolve()}")
    return timings


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
