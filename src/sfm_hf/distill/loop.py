"""The loop of Stage II: prepare (or resume) this process's images and optimiser, optimise, gather the result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger

from ..config import Config
from ..errors import RunStopped
from ..progress import progress as track
from ..pyramid import build_images, growth_due
from ..layout import RunLayout
from ..snapshots import keep_snapshots_until, write_snapshot
from .checkpoints import CheckpointError, checkpoint_fingerprint, read_checkpoint, restore_rng, save_checkpoint
from .inputs import DistillTarget, check_targets, start_images
from .losses import ClassShare, DistillContext, build_context, class_share, compute_loss

logger = get_logger(__name__)


class NonFiniteLossError(RunStopped):
    """The loss became NaN or infinite; the last good checkpoint is kept."""



def make_optimizer(images, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam on the image parameters; the fused kernel on CUDA (one launch for all levels)."""
    return torch.optim.Adam(images.parameters(), lr=lr, fused=device.type == "cuda")



def grow_if_due(images, optimizer: torch.optim.Adam, step: int, config: Config, device: torch.device):
    """Add a pyramid level when ``step`` is a growth step; returns the optimiser to use from now on."""
    options = config.distill
    if not (options.representation == "pyramid" and growth_due(step, options.pyramid_every) and images.can_grow()):
        return optimizer
    images.grow()
    previous = optimizer
    optimizer = make_optimizer(images, options.lr, device)
    if not options.reset_optimizer_on_growth:
        optimizer.state.update({p: previous.state[p] for p in images.parameters() if p in previous.state})
    return optimizer


def train_step(context: DistillContext, images, optimizer: torch.optim.Adam, step: int) -> torch.Tensor:
    """One update of the synthetic images; returns the loss detached and on the device (reading it syncs)."""
    loss = compute_loss(context, images(), step)
    # Every process computes the same loss; the all-reduce backward sums world_size identical
    # gradients, so each process back-propagates its 1/world_size share.
    (loss / context.world_size).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def joint_train_step(contexts: list[DistillContext], images, optimizer: torch.optim.Adam, step: int) -> torch.Tensor:
    """One update of a joint synthetic set against several backbones; returns the mean loss, detached.

    The images are decoded once; each backbone's loss / n is back-propagated to them in turn, so
    only one backbone's activations are alive at a time, and the summed gradient (that of the mean
    loss) then flows once through the image parameterisation.
    """
    pixels = images()
    leaf = pixels.detach().requires_grad_(True)
    total = torch.zeros((), device=pixels.device)
    for context in contexts:
        loss = compute_loss(context, leaf, step)
        (loss / (len(contexts) * context.world_size)).backward()
        total = total + loss.detach()
    pixels.backward(leaf.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(contexts)


def _gather_images(accelerator, local: torch.Tensor, shares: list[ClassShare]) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return local
    padded = accelerator.pad_across_processes(local.contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    rows = padded.shape[0]
    return torch.cat([gathered[rank * rows : rank * rows + share.num_images] for rank, share in enumerate(shares)])



@dataclass
class DistillRun:
    """What the loop of Stage II works on: this process's images and optimiser, and where it resumes from."""

    config: Config  # settings resolved (resolve_settings)
    targets: list[DistillTarget]
    contexts: list[DistillContext]
    shares: list[ClassShare]  # every process's classes, to gather the images
    start: torch.Tensor | None  # the real start images of all classes, or None for noise
    images: torch.nn.Module
    optimizer: torch.optim.Adam
    fingerprint: dict
    checkpoint_path: Path
    inputs: dict  # what synthetic.json records the images as a function of
    start_step: int = 0
    earlier_seconds: float = 0.0  # of the runs before a resume
    last_loss: torch.Tensor | None = None
    saved_step: int | None = None  # of the last checkpoint written or resumed from


def prepare_run(config: Config, accelerator, targets: list[DistillTarget], inputs: dict) -> DistillRun:
    """Contexts, start images and optimiser of this process, resumed from its checkpoint when one fits."""
    options = config.distill
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    check_targets(targets)
    if options.compile:
        for target in targets:
            target.backbone = torch.compile(target.backbone)
    statistics = targets[0].statistics
    contexts = [build_context(target.config, target.backbone, target.statistics, rank=rank, world_size=world_size,
                              device=device) for target in targets]
    share = contexts[0].share
    shares = [class_share(statistics.num_classes, config.ipc, r, world_size) for r in range(world_size)]
    # A joint set starts from the images chosen in its first backbone's feature cache.
    start = start_images(targets[0].config, statistics)
    local_start = None if start is None else start[share.first_image : share.first_image + share.num_images]
    images = build_images(
        options.representation, share.num_images, options.syn_res, seed=config.seed,
        decorrelate=options.decorrelate, index_offset=share.first_image, start=local_start,
    ).to(device)
    run = DistillRun(
        config, targets, contexts, shares, start, images, make_optimizer(images, options.lr, device),
        checkpoint_fingerprint(config, [target.statistics for target in targets], world_size),
        RunLayout(config.output_dir).checkpoint(rank), inputs,
        last_loss=torch.full((), float("nan"), device=device),
    )
    _resume(run, accelerator)
    return run


def _resume(run: DistillRun, accelerator) -> None:
    """Load this process's checkpoint into ``run`` when one of these inputs and settings exists."""
    device, options, checkpoint_path = accelerator.device, run.config.distill, run.checkpoint_path
    state = read_checkpoint(checkpoint_path, run.fingerprint)
    if state is None:
        return
    try:
        run.images.load_levels([level.to(device) for level in state["levels"]])
        run.optimizer = make_optimizer(run.images, options.lr, device)
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"Checkpoint {checkpoint_path} does not fit this run's images ({error}). Delete "
            f"{checkpoint_path.parent} to start distillation over."
        ) from None
    restore_rng(state["rng"])
    run.start_step = run.saved_step = state["step"]
    run.earlier_seconds = state["seconds"]
    run.last_loss = torch.full((), state["loss"], device=device)
    if accelerator.is_main_process:
        logger.info(f"Stage II: resuming from step {run.start_step} ({checkpoint_path.parent}).")


def _stop_if_non_finite(run: DistillRun, first_bad_step: torch.Tensor) -> None:
    """Raise once a step's loss was NaN or infinite (read from the device only where the loop syncs anyway)."""
    bad = int(first_bad_step)
    if bad >= 0:
        options = run.config.distill
        kept = (
            f"The last good checkpoint (step {run.saved_step}) is kept in {run.checkpoint_path.parent}."
            if run.saved_step is not None else
            f"No checkpoint was written before it (distill.checkpoint_every: {options.checkpoint_every})."
        )
        raise NonFiniteLossError(
            f"Stage II stopped: the {options.method} loss became non-finite at step {bad}. {kept} Try a lower "
            "distill.lr or distill.mixed_precision: no."
        )


def optimise(run: DistillRun, accelerator) -> float:
    """The steps from ``run.start_step`` to ``distill.iterations``, with logging and checkpoints; returns the
    seconds of distillation in all (earlier runs included)."""
    config, options, device = run.config, run.config.distill, accelerator.device
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    progress = track(
        range(run.start_step, options.iterations), initial=run.start_step, total=options.iterations,
        desc=f"Stage II: {options.method}", unit="step", mode=config.progress,
        enabled=accelerator.is_local_main_process,
    )
    clock = _DistillClock(run.earlier_seconds, device)
    snapshots = _Snapshots(run, accelerator)
    snapshots.begin(clock)
    for step in progress:
        run.optimizer = grow_if_due(run.images, run.optimizer, step, config, device)
        if len(run.contexts) == 1:
            detached = train_step(run.contexts[0], run.images, run.optimizer, step)
        else:
            detached = joint_train_step(run.contexts, run.images, run.optimizer, step)
        first_bad_step = torch.where(
            (first_bad_step < 0) & ~torch.isfinite(detached), torch.full_like(first_bad_step, step), first_bad_step
        )
        run.last_loss = detached
        done = step + 1
        if done % options.log_every == 0 or done == options.iterations:
            _stop_if_non_finite(run, first_bad_step)
            value = float(run.last_loss)
            progress.set_postfix(loss=f"{value:.4f}")
            accelerator.log({"distill/loss": value}, step=done)
        if options.checkpoint_every and done % options.checkpoint_every == 0 and done < options.iterations:
            _stop_if_non_finite(run, first_bad_step)
            save_checkpoint(run.checkpoint_path, run.images, run.optimizer, done, run.fingerprint,
                            loss=float(run.last_loss), seconds=clock.seconds())
            run.saved_step = done
        if done < options.iterations:
            snapshots.after_step(done, clock)
    progress.close()
    # A finished checkpoint re-made into synthetic/ runs no step: it reports the time it recorded, to the digit.
    seconds = clock.seconds() if options.iterations > run.start_step else run.earlier_seconds
    if options.iterations > run.start_step:
        _stop_if_non_finite(run, first_bad_step)
        # Outside the loop, at the seconds the run reports: the last snapshot is synthetic.json's images and time.
        snapshots.write(options.iterations, seconds)
    return seconds


class _DistillClock:
    """Seconds of distillation: the earlier runs' and this one's, less the pauses (snapshot writing)."""

    def __init__(self, earlier: float, device: torch.device) -> None:
        self.earlier, self.device = earlier, device
        self.start, self.paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        if self.device.type == "cuda":  # the steps queued so far belong to the time read now
            torch.cuda.synchronize(self.device)
        return self.earlier + time.perf_counter() - self.start - self.paused

    def pause_since(self, since: float) -> None:
        self.paused += time.perf_counter() - since


class _Snapshots:
    """``distill.snapshot_every``: the images at step 0, every that many steps and at the last step
    (:mod:`sfm_hf.snapshots`); written by the main process, gathered by all."""

    def __init__(self, run: DistillRun, accelerator) -> None:
        self.run, self.accelerator = run, accelerator
        self.every = run.config.distill.snapshot_every
        self.folder = RunLayout(run.config.output_dir).synthetic_dir

    def begin(self, clock: _DistillClock) -> None:
        """Drop snapshots a resumed run makes again (all of them when it starts over, with or without new ones:
        they show other images); snapshot step 0."""
        if self.accelerator.is_main_process:
            keep_snapshots_until(self.folder, self.run.start_step)
        if self.every and self.run.start_step == 0:
            self._paused(0, clock)

    def after_step(self, done: int, clock: _DistillClock) -> None:
        if self.every and done % self.every == 0:
            self._paused(done, clock)

    def _paused(self, step: int, clock: _DistillClock) -> None:
        """A snapshot inside the loop, its writing left out of the clock."""
        seconds = clock.seconds()
        paused_at = time.perf_counter()
        self.write(step, seconds)
        clock.pause_since(paused_at)

    def write(self, step: int, seconds: float) -> None:
        if not self.every:
            return
        with torch.no_grad():
            local = self.run.images().detach()
        images = _gather_images(self.accelerator, local, self.run.shares).cpu()
        if self.accelerator.is_main_process:
            statistics = self.run.targets[0].statistics
            labels = torch.arange(statistics.num_classes).repeat_interleave(self.run.config.ipc)
            write_snapshot(self.folder, step, seconds, images, labels)


def final_images(run: DistillRun, accelerator, seconds: float) -> torch.Tensor:
    """Every process's images gathered (all classes, on the CPU); the last checkpoint written."""
    options = run.config.distill
    with torch.no_grad():
        local = run.images().detach()
    final = _gather_images(accelerator, local, run.shares).cpu()
    if options.checkpoint_every:
        save_checkpoint(run.checkpoint_path, run.images, run.optimizer, max(run.start_step, options.iterations),
                        run.fingerprint, loss=float(run.last_loss), seconds=seconds)
    return final

