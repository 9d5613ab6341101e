"""Stage II: optimise ``ipc`` synthetic images per class so that their flow matches the statistical flow.

One loop serves SFM (and its TCDD/NCDD ablations) and the LGM baseline. Under Accelerate the
classes are divided between processes: each process forwards only its own images, the
per-class feature sums are all-reduced *with autograd*, every process computes the same
global loss, and gradients reach only its own images. Every random number is a function of
(seed, step, global image index), so 1 and N processes, or an interrupted and resumed run,
produce the same images.

Modules, in the order a run uses them: ``inputs`` (statistics, start images, resumability), ``losses``
(each method's step loss), ``loop`` (prepare, optimise, gather), ``checkpoints``, ``outputs`` (``synthetic/``).
"""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from ..config import Config
from ..layout import RunLayout
from .checkpoints import synthetic_inputs
from .inputs import distill_targets, is_up_to_date, resolve_settings
from .loop import final_images, optimise, prepare_run
from .outputs import reset_peak_memory, write_outputs

logger = get_logger(__name__)


def run_distill(config: Config, accelerator) -> Path:
    """Stage II; writes ``<output_dir>/synthetic/`` and returns that folder: prepare (or resume), optimise, write."""
    folder = RunLayout(config.output_dir).synthetic_dir
    targets = distill_targets(config, accelerator.device)
    config = resolve_settings(config, targets)
    inputs = synthetic_inputs(config, [target.statistics for target in targets])
    if is_up_to_date(folder, inputs):
        if accelerator.is_main_process:
            logger.info(f"Stage II: {folder} already holds the images of these inputs and settings; nothing to do.")
        return folder
    reset_peak_memory(accelerator.device)
    run = prepare_run(config, accelerator, targets, inputs)
    seconds = optimise(run, accelerator)
    final = final_images(run, accelerator, seconds)
    if accelerator.is_main_process:
        write_outputs(run, accelerator, final, seconds, folder)
    accelerator.wait_for_everyone()
    return folder
