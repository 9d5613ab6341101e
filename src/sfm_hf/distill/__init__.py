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

from dataclasses import replace
from pathlib import Path

from accelerate.logging import get_logger

from ..config import Config
from ..layout import RunLayout
from .checkpoints import synthetic_inputs
from .inputs import DistillTarget, check_memory, distill_targets, is_up_to_date, resolve_settings
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
    check_memory(config, targets[0].statistics.num_classes, accelerator.device, accelerator.num_processes)
    if accelerator.is_main_process:
        warn_if_below_input_size(config, targets)
    reset_peak_memory(accelerator.device)
    run = prepare_run(config, accelerator, targets, inputs)
    seconds = optimise(run, accelerator)
    final = final_images(run, accelerator, seconds)
    if accelerator.is_main_process:
        write_outputs(run, accelerator, final, seconds, folder)
    accelerator.wait_for_everyone()
    return folder


def warn_if_below_input_size(config: Config, targets: list[DistillTarget]) -> None:
    """A synthetic side below a backbone's input size is upsampled into every view: legal, but the images then hold
    far less detail than the real images their statistics came from (a 1- or 3-px set is a few colours)."""
    side = config.distill.syn_res
    for target in targets:
        size = target.backbone.image_size
        if side < size:
            auto = replace(config.distill, syn_res="auto").resolution(size, config.data.crop_ratio)
            logger.warning(
                f"distill.syn_res {side} is below the {size}-px input of backbone {target.config.backbone!r}: every "
                f"view is upsampled from at most {side}x{side} pixels, so the images hold far less detail than the "
                f"real ones it sees (auto gives {auto})."
            )
