"""Stage II cost: seconds per step, peak memory and backbone throughput of SFM and LGM.

Every step is the library's own ``sfm_hf.distill.loop.train_step`` on a context from
``sfm_hf.distill.losses.build_context``, so the figures are those of a real run; only the
statistics are random (a step's cost does not depend on their values) and the pyramid
starts fully grown (the state of most of a 5000-step run). LGM streams its real batch
(ipc x aug_rounds images of every class per step) from a locally generated JPEG dataset.

    python benchmarks/distill_cost.py --compare                       # CPU, tiny backbone, a few minutes
    python benchmarks/distill_cost.py --backbone vit-b14 --compare --mixed-precision bf16 --num-workers 8  # GPU
    python benchmarks/distill_cost.py --knobs                         # effect of each fast-path flag

``--compare`` times sfm and lgm in one process, one step of each in turn, and measures each
method's peak memory in a fresh child process of its own (peaks of two methods in one
process would mix). With ``--json`` the last line is one JSON object with the figures and
``ratio_time`` / ``ratio_memory`` (lgm / sfm).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (
    DEFAULT_CACHE, PRESETS, PeakMemory, StepTimer, build_backbone, configure_threads, dataset_summary, environment,
    make_jpeg_dataset, markdown_table, print_json_last, resolve_device, summarise,
)

import torch  # noqa: E402  (harness sets the offline switches first)

from sfm_hf.backbones import FrozenBackbone, load_backbone  # noqa: E402
from sfm_hf.config import Config  # noqa: E402
from sfm_hf.distill.loop import make_optimizer, train_step  # noqa: E402
from sfm_hf.distill.losses import DistillContext, build_context  # noqa: E402
from sfm_hf.pyramid import build_images  # noqa: E402
from sfm_hf.statistics import Statistics  # noqa: E402

PROJECTED_STEPS = 5000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny",
                        help=f"Preset with random weights ({', '.join(PRESETS)}) or a model folder / id.")
    parser.add_argument("--num-classes", type=int, default=100, help="Classes C (synthetic images = C x ipc).")
    parser.add_argument("--ipc", type=int, default=1, help="Synthetic images per class.")
    parser.add_argument("--syn-res", type=int, default=None, help="Synthetic resolution (default: the preset's).")
    parser.add_argument("--method", choices=("sfm", "lgm"), default="sfm", help="Method when not comparing.")
    parser.add_argument("--sfm-rounds", type=int, default=1, help="Augmentation rounds of SFM (paper: 1).")
    parser.add_argument("--lgm-rounds", type=int, default=10, help="Augmentation rounds of LGM (paper: 10).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per method.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation, caches).")
    parser.add_argument("--compare", action="store_true", help="Run sfm and lgm alternately and print lgm/sfm.")
    parser.add_argument("--knobs", action="store_true",
                        help="Time --method with each fast-path flag against the defaults, alternately.")
    parser.add_argument("--json", action="store_true", help="Make the last output line one JSON object.")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="distill.mixed_precision.")
    parser.add_argument("--compile", action="store_true", help="distill.compile (torch.compile of the backbone).")
    parser.add_argument("--attention", default=None, help="attn_implementation (default: transformers' own, SDPA).")
    parser.add_argument("--checkpoint-chunk", type=int, default=0,
                        help="distill.checkpoint_chunk (activation checkpointing in chunks of this many views).")
    parser.add_argument("--channels-last", action="store_true",
                        help="Experiment, not a library option: channels-last weights for the backbone's convolutions.")
    parser.add_argument("--real-size", default=None, help="WxH of the generated real JPEGs (default: the preset's).")
    parser.add_argument("--real-per-class", type=int, default=None,
                        help="Real images per class in the generated dataset (default: 3 x ipc x lgm-rounds).")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers for LGM's real stream.")
    parser.add_argument("--data-batch-size", type=int, default=256, help="data.batch_size for LGM's real stream.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU default: 1).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="Where backbones and datasets are kept.")
    parser.add_argument("--memory-steps", type=int, default=3, help="Steps of each child run that measures memory.")
    return parser.parse_args(argv)


def random_statistics(num_classes: int, feature_dim: int, seed: int = 0) -> Statistics:
    """Class means of the right shape; a step costs the same whatever their values."""
    generator = torch.Generator().manual_seed(seed)
    return Statistics(
        class_means=torch.randn(num_classes, feature_dim, generator=generator),
        class_counts=torch.full((num_classes,), 1300, dtype=torch.int64),
        class_names=[f"class_{c:04d}" for c in range(num_classes)],
        metadata={"non_target": "class_mean"},
    )


class TimedDraws:
    """Wraps LGM's real stream to record the host seconds each draw of a real batch takes."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.seconds: list[float] = []

    def draw(self):
        start = time.perf_counter()
        batch = self.stream.draw()
        self.seconds.append(time.perf_counter() - start)
        return batch


@dataclass
class MethodRun:
    """One method's state: context, images, optimiser and its measurements."""

    name: str
    context: DistillContext
    images: torch.nn.Module
    optimizer: torch.optim.Optimizer
    timer: StepTimer
    backbone_images_per_step: int
    real_images_per_step: int
    draws: TimedDraws | None = None
    step: int = 0
    first_step_s: float | None = None
    loss: torch.Tensor | None = None
    warm_draws: int = 0
    error: str | None = None

    def run_step(self, timed: bool) -> None:
        started = self.timer.start() if timed else None
        wall = time.perf_counter()
        self.loss = train_step(self.context, self.images, self.optimizer, self.step)
        if timed:
            self.timer.stop(started)
        elif self.first_step_s is None:
            self.loss.item()  # the first step's time includes compilation; wait for it
            self.first_step_s = time.perf_counter() - wall
        self.step += 1

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.run_step(timed=False)
        self.warm_draws = len(self.draws.seconds) if self.draws else 0

    def describe(self) -> dict:
        return {
            "method": self.context.config.distill.method,
            "aug_rounds": self.context.config.distill.aug_rounds,
            "synthetic_images": self.context.share.num_images,
            "real_images_per_step": self.real_images_per_step,
            "backbone_images_per_step": self.backbone_images_per_step,
        }

    def result(self) -> dict:
        """Timing figures; an out-of-memory run reports only its error."""
        if self.error is not None:
            return {**self.describe(), "error": self.error, "memory": None}
        timing = summarise(self.timer.seconds())
        median = timing["median_s"]
        result = {
            **self.describe(),
            **timing,
            "images_per_s": self.backbone_images_per_step / median,
            "projected_5000_steps_min": median * PROJECTED_STEPS / 60,
            "first_step_s": self.first_step_s,
            "final_loss": float(self.loss),
        }
        if self.draws is not None:
            result["real_data_s_per_step"] = summarise(self.draws.seconds[self.warm_draws :])["median_s"]
        return result


def guarded(run: MethodRun, action) -> bool:
    """Run ``action``; an out-of-memory error marks the run as failed (a finding, not a crash)."""
    try:
        action()
        return True
    except torch.cuda.OutOfMemoryError as error:
        run.error = f"CUDA out of memory: {str(error).splitlines()[0]}"
        run.images = run.optimizer = run.loss = None
        torch.cuda.empty_cache()
        return False


def release() -> None:
    """Free what the finished runs left (cycles, cached GPU blocks) before a child process measures memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_shared_backbone(args: argparse.Namespace, device: torch.device):
    """The backbone as ``run_distill`` prepares it for these options."""
    backbone = load_backbone(build_backbone(args.backbone, args.cache_dir), device=device,
                             attn_implementation=args.attention)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return torch.compile(backbone) if args.compile else backbone


def real_dataset(args: argparse.Namespace) -> Path:
    preset = PRESETS.get(args.backbone)
    if args.real_size:
        width, height = (int(v) for v in args.real_size.lower().split("x"))
    else:
        width, height = preset.real_size if preset else (500, 375)
    per_class = args.real_per_class or 3 * args.ipc * args.lgm_rounds
    return make_jpeg_dataset(args.num_classes, per_class, (width, height), cache_dir=args.cache_dir)


def syn_res(args: argparse.Namespace) -> int:
    if args.syn_res:
        return args.syn_res
    preset = PRESETS.get(args.backbone)
    return preset.syn_res if preset else 256


def make_run(args, method: str, backbone: FrozenBackbone, statistics: Statistics, device: torch.device,
             workdir: Path, *, dataset: Path | None, name: str | None = None) -> MethodRun:
    """A context and fully grown pyramid for ``method``, exactly as ``run_distill`` would set them up."""
    config = Config(dataset=str(dataset or ""), backbone=args.backbone, output_dir=str(workdir), ipc=args.ipc, seed=0)
    options = config.distill
    options.method = method
    options.aug_rounds = args.lgm_rounds if method == "lgm" else args.sfm_rounds
    options.syn_res = syn_res(args)
    options.mixed_precision = args.mixed_precision
    options.checkpoint_chunk = args.checkpoint_chunk
    config.data.batch_size = args.data_batch_size
    config.data.num_workers = args.num_workers
    context = build_context(config, backbone, statistics, rank=0, world_size=1, device=device)
    draws = None
    if context.real_stream is not None:
        draws = TimedDraws(context.real_stream)
        context.real_stream = draws
    images = build_images(options.representation, context.share.num_images, options.syn_res, seed=config.seed,
                          decorrelate=options.decorrelate).to(device)
    while images.can_grow():
        images.grow()
    views = context.share.num_images * options.aug_rounds
    real = views if method == "lgm" else 0
    return MethodRun(
        name=name or method, context=context, images=images, optimizer=make_optimizer(images, options.lr, device),
        timer=StepTimer(device), backbone_images_per_step=views + real, real_images_per_step=real, draws=draws,
    )


def measure_alone(args, device: torch.device) -> dict:
    """One method in this (fresh) process: warm-up, then timed steps with the peak memory of those steps."""
    backbone = load_shared_backbone(args, device)
    unwrapped = getattr(backbone, "_orig_mod", backbone)
    statistics = random_statistics(args.num_classes, unwrapped.feature_dim)
    dataset = real_dataset(args) if args.method == "lgm" else None
    with tempfile.TemporaryDirectory() as workdir:
        run = make_run(args, args.method, backbone, statistics, device, Path(workdir), dataset=dataset)
        memory = PeakMemory(device)

        def measure() -> None:
            run.warm_up(args.warmup)
            memory.reset()
            for _ in range(args.steps):
                run.run_step(timed=True)

        guarded(run, measure)
        result = run.result()
        if run.error is None:
            result["memory"] = memory.read()
        return result


def child_memory(args) -> dict | None:
    """The peak memory of ``args.method`` with these options, measured alone in a fresh process."""
    method = args.method
    command = [
        sys.executable, str(Path(__file__).resolve()), "--json", "--method", method,
        "--steps", str(args.memory_steps), "--warmup", "1",
        "--backbone", args.backbone, "--num-classes", str(args.num_classes), "--ipc", str(args.ipc),
        "--syn-res", str(syn_res(args)), "--sfm-rounds", str(args.sfm_rounds), "--lgm-rounds", str(args.lgm_rounds),
        "--mixed-precision", args.mixed_precision, "--num-workers", str(args.num_workers),
        "--data-batch-size", str(args.data_batch_size), "--device", args.device, "--cache-dir", str(args.cache_dir),
        "--checkpoint-chunk", str(args.checkpoint_chunk),
    ]
    for flag, value in (("--real-size", args.real_size), ("--real-per-class", args.real_per_class),
                        ("--threads", args.threads), ("--attention", args.attention)):
        if value is not None:
            command += [flag, str(value)]
    command += [flag for flag, on in (("--compile", args.compile), ("--channels-last", args.channels_last)) if on]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"memory run of {method} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])["results"][method]["memory"]


def alternate(runs: list[MethodRun], steps: int) -> None:
    """One timed step of each run in turn, so slow drifts of the machine hit every run alike."""
    for _ in range(steps):
        for run in runs:
            if run.error is None:
                guarded(run, lambda: run.run_step(timed=True))


def _time_alternately(args, device: torch.device, variants: dict[str, argparse.Namespace],
                      share_backbone: bool) -> dict[str, dict]:
    dataset = real_dataset(args) if any(v.method == "lgm" for v in variants.values()) else None
    runs, backbone = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for name, variant in variants.items():
            if backbone is None or not share_backbone:
                backbone = load_shared_backbone(variant, device)
            unwrapped = getattr(backbone, "_orig_mod", backbone)
            statistics = random_statistics(args.num_classes, unwrapped.feature_dim)
            run = make_run(variant, variant.method, backbone, statistics, device, Path(workdir), dataset=dataset,
                           name=name)
            guarded(run, lambda: run.warm_up(args.warmup))
            runs.append(run)
        alternate(runs, args.steps)
        return {run.name: run.result() for run in runs}


def timed_runs(args, device: torch.device, variants: dict[str, argparse.Namespace],
               share_backbone: bool) -> dict[str, dict]:
    """Build every run, warm each up, time them alternately; then free everything and measure each run's
    memory alone in a fresh child process."""
    results = _time_alternately(args, device, variants, share_backbone)
    release()
    for name, result in results.items():
        if "error" not in result:
            result["memory"] = child_memory(variants[name])
    return results


def memory_basis(device: torch.device) -> str:
    """GPU: the whole allocated peak (as the paper reports); CPU: the steps' own share of the process's RSS."""
    return "peak_mib" if device.type == "cuda" else "delta_mib"


def compare(args, device: torch.device) -> dict:
    variants = {method: with_options(args, method=method) for method in ("sfm", "lgm")}
    results = timed_runs(args, device, variants, share_backbone=True)
    sfm, lgm = results["sfm"], results["lgm"]
    key = memory_basis(device)
    both = "error" not in sfm and "error" not in lgm
    dataset = real_dataset(args)
    return {
        "results": results,
        "ratio_time": lgm["median_s"] / sfm["median_s"] if both else None,
        "ratio_memory": lgm["memory"][key] / max(sfm["memory"][key], 1e-9) if both else None,
        "ratio_memory_basis": key,
        "ratio_memory_peak": lgm["memory"]["peak_mib"] / sfm["memory"]["peak_mib"] if both else None,
        "dataset": {"path": str(dataset), **dataset_summary(dataset)},
    }


def with_options(args: argparse.Namespace, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **overrides})


def knob_variants(args: argparse.Namespace) -> dict[str, argparse.Namespace]:
    """The defaults and each fast-path flag alone on top of them (not on top of the flags given)."""
    defaults = with_options(args, mixed_precision="no", compile=False, attention=None, channels_last=False,
                            checkpoint_chunk=0)
    # A quarter of the views per chunk keeps about a quarter of the activations.
    chunk = max(1, args.num_classes * args.ipc * (args.lgm_rounds if args.method == "lgm" else args.sfm_rounds) // 4)
    flags = {
        "defaults": {},
        "bf16": {"mixed_precision": "bf16"},
        "compile": {"compile": True},
        "bf16+compile": {"mixed_precision": "bf16", "compile": True},
        "eager attention (vs SDPA)": {"attention": "eager"},
        "channels_last": {"channels_last": True},
        f"checkpoint_chunk={chunk}": {"checkpoint_chunk": chunk},
    }
    return {name: with_options(defaults, **overrides) for name, overrides in flags.items()}


def knobs(args, device: torch.device) -> dict:
    """``--method`` under each fast-path flag, one step of each variant in turn; time relative to the defaults,
    memory from a fresh child process per variant."""
    variants = knob_variants(args)
    results = timed_runs(args, device, variants, share_backbone=False)
    base = results["defaults"]
    key = memory_basis(device)
    for result in results.values():
        if "error" not in result and "error" not in base:
            result["time_vs_defaults"] = result["median_s"] / base["median_s"]
            result["memory_vs_defaults"] = result["memory"][key] / max(base["memory"][key], 1e-9)
    return {"results": results}


def print_report(args, report: dict, device: torch.device) -> None:
    rows = []
    for name, result in report["results"].items():
        memory = result.get("memory") or {}
        if "error" in result:
            spread = result["error"][:60]
        else:
            spread = f"{result['p25_s']:.3g}-{result['p75_s']:.3g} ({result['min_s']:.3g}-{result['max_s']:.3g})"
        rows.append({**result, "variant": name, "spread": spread, "peak": memory.get("peak_mib"),
                     "delta": memory.get("delta_mib")})
    columns = [("variant", "run"), ("aug_rounds", "aug rounds"), ("backbone_images_per_step", "backbone images/step"),
               ("median_s", "s/step (median)"), ("spread", "p25-p75 (min-max)"), ("images_per_s", "images/s"),
               ("projected_5000_steps_min", "5000 steps (min)")]
    columns += [("peak", "peak MiB"), ("delta", "step MiB")]
    if args.knobs:
        columns += [("time_vs_defaults", "time vs defaults"), ("memory_vs_defaults", "memory vs defaults"),
                    ("first_step_s", "first step s")]
    else:
        columns += [("real_data_s_per_step", "real-data s/step")]
    env = report["environment"]
    print(f"\n{env['device']} ({env['device_type']}, torch {env['torch']}, {env['torch_threads']} thread(s)); "
          f"backbone {args.backbone}, C={args.num_classes}, ipc={args.ipc}, syn_res={syn_res(args)}, "
          f"mixed_precision={args.mixed_precision}, compile={args.compile}, {args.steps} steps after {args.warmup}")
    print(markdown_table(rows, columns))
    if report.get("ratio_time") is not None:
        first = next(iter(report["results"].values()))
        print(f"\nlgm/sfm: time {report['ratio_time']:.2f}x, memory {report['ratio_memory']:.2f}x "
              f"({report['ratio_memory_basis']} of {first['memory']['kind']}; peak-to-peak "
              f"{report['ratio_memory_peak']:.2f}x). Paper (H100, EVA-02, IN-100): 4x time, 10x memory.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    configure_threads(args.threads, device)
    if args.compare:
        report = compare(args, device)
    elif args.knobs:
        report = knobs(args, device)
    else:
        report = {"results": {args.method: measure_alone(args, device)}}
    report = {"benchmark": "distill_cost", "config": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
              "environment": environment(device), **report}
    report.setdefault("ratio_time", None)
    report.setdefault("ratio_memory", None)
    print_report(args, report, device)
    if args.json:
        print_json_last(report)
    return report


if __name__ == "__main__":
    main()
