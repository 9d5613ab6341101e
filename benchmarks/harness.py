"""Pieces the benchmarks share: random-weight backbones, generated JPEG datasets, step timers, memory peaks, tables.

Nothing here is timed or asserted by the test suite; the scripts print what they measure.
Everything is built locally (no Hub access), so the benchmarks run offline.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import math
import os
import platform
import statistics as stats
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("SFM_BENCH_CACHE", Path.home() / ".cache" / "sfm-hf-bench"))
MIB = 1 << 20


@dataclass(frozen=True)
class Preset:
    """A backbone size with random weights (speed does not depend on the weights) and matching defaults."""

    family: str
    options: dict
    syn_res: int
    real_size: tuple[int, int]
    description: str


PRESETS = {
    "tiny": Preset(
        "dinov2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                       image_size=28, patch_size=14),
        32, (64, 48), "DINOv2-family ViT, hidden 64, 2 layers, 28 px input (CPU default)",
    ),
    "small": Preset(
        "dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=56, patch_size=14),
        64, (128, 96), "DINOv2 ViT-S/14 (hidden 384, 12 layers) at 56 px: ViT-S compute per token, CPU-sized",
    ),
    "vit-b14": Preset(
        "dinov2", dict(image_size=224, patch_size=14), 256, (500, 375),
        "DINOv2 ViT-B/14 (hidden 768, 12 layers) at 224 px, random weights",
    ),
    "vit-b16": Preset("vit", dict(image_size=224, patch_size=16), 256, (500, 375),
                      "ViT-B/16 (hidden 768, 12 layers) at 224 px, random weights"),
    "eva02-b14": Preset("timm", dict(architecture="eva02_base_patch14_224"), 256, (500, 375),
                        "timm EVA-02 ViT-B/14 at 224 px (the paper's cost figure), random weights"),
}


def build_backbone(preset: str, cache_dir: Path = DEFAULT_CACHE) -> str:
    """A saved model folder for ``preset`` (built once, then reused); any other value is returned as a load id."""
    if preset not in PRESETS:
        return preset
    folder = cache_dir / "backbones" / preset
    if (folder / "config.json").is_file():
        return str(folder)
    import transformers as tf

    spec = PRESETS[preset]
    torch.manual_seed(0)
    if spec.family == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**spec.options))
    elif spec.family == "vit":
        model = tf.ViTModel(tf.ViTConfig(**spec.options), add_pooling_layer=False)
    else:
        model = tf.TimmWrapperModel(tf.TimmWrapperConfig(**spec.options))
    temporary = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(temporary)
    temporary.replace(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# A locally generated JPEG dataset in Hub layout (data/train-*.parquet, Image + ClassLabel).


def _texture_bank(rng: np.random.Generator, width: int, height: int, count: int = 6) -> np.ndarray:
    """Smooth-to-fine random textures at twice the image size; images are random windows of them."""
    from PIL import Image

    bank = np.empty((count, 2 * height, 2 * width, 3), np.float32)
    for k in range(count):
        layers = []
        for cells, amplitude in ((8, 0.8), (32, 0.4), (128, 0.15)):
            small = (rng.random((max(2, 2 * height // cells), max(2, 2 * width // cells), 3)) * 255).astype(np.uint8)
            big = Image.fromarray(small).resize((2 * width, 2 * height), Image.BICUBIC)
            layers.append((np.asarray(big, np.float32) - 128.0) * amplitude)
        bank[k] = sum(layers)
    return bank


def _encode_images(job: tuple[int, int, int, int, int, int, int]) -> list[bytes]:
    """JPEG bytes of ``count`` images of class ``label``: a class colour, two textures, sensor-like grain."""
    from PIL import Image

    label, num_classes, count, width, height, quality, seed = job
    rng = np.random.default_rng(seed * 1_000_003 + label)
    bank = _texture_bank(rng, width, height)
    hue = 2 * math.pi * label / num_classes
    colour = 128 + 60 * np.array([math.cos(hue), math.cos(hue + 2.1), math.cos(hue + 4.2)], np.float32)
    encoded = []
    for _ in range(count):
        picks = rng.integers(0, len(bank), 2)
        y, x = rng.integers(0, height, 2), rng.integers(0, width, 2)
        image = colour + bank[picks[0], y[0] : y[0] + height, x[0] : x[0] + width]
        image += 0.5 * bank[picks[1], y[1] : y[1] + height, x[1] : x[1] + width]
        image += rng.normal(0.0, 4.0, (height, width, 1)).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded


def make_jpeg_dataset(
    num_classes: int, per_class: int, size: tuple[int, int], *, quality: int = 90, seed: int = 0,
    workers: int | None = None, cache_dir: Path = DEFAULT_CACHE, rows_per_file: int = 2000,
) -> Path:
    """A Hub-layout parquet dataset of ``num_classes * per_class`` JPEGs of ``size`` (W, H); reused when present."""
    import datasets

    width, height = size
    folder = cache_dir / "datasets" / f"jpeg-c{num_classes}-n{per_class}-{width}x{height}-q{quality}-s{seed}"
    if (folder / "DONE").is_file():
        return folder
    jobs = [(label, num_classes, per_class, width, height, quality, seed) for label in range(num_classes)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    print(f"Generating {num_classes * per_class} JPEGs ({width}x{height}) in {folder} ...", flush=True)
    with get_context("fork").Pool(workers) as pool:
        per_label = pool.map(_encode_images, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    rows = [(image, label) for label, images in enumerate(per_label) for image in images]
    order = np.random.default_rng(seed).permutation(len(rows))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c:04d}" for c in range(num_classes)])}
    )
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    num_files = max(1, math.ceil(len(rows) / rows_per_file))
    for number in range(num_files):
        chosen = order[number * rows_per_file : (number + 1) * rows_per_file]
        part = datasets.Dataset.from_dict(
            {"image": [{"bytes": rows[i][0], "path": None} for i in chosen], "label": [rows[i][1] for i in chosen]},
            features=features,
        )
        part.to_parquet(str(data_dir / f"train-{number:05d}-of-{num_files:05d}.parquet"))
    mean_bytes = float(np.mean([len(image) for image, _ in rows]))
    (folder / "DONE").write_text(json.dumps({"images": len(rows), "mean_jpeg_bytes": mean_bytes}))
    return folder


def dataset_summary(folder: Path) -> dict:
    return json.loads((folder / "DONE").read_text())


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step durations. On CUDA from events on the GPU timeline, so timing adds no host-device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pairs: list = []

    def start(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._pairs.append((started, event))
        else:
            self._pairs.append((started, time.perf_counter()))

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            synchronize(self.device)
            return [start.elapsed_time(stop) / 1000.0 for start, stop in self._pairs]
        return [stop - start for start, stop in self._pairs]


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak memory over a phase: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS (VmHWM) on CPU.

    On CPU, :meth:`reset` returns freed heap memory to the kernel (``malloc_trim``) and resets its
    high-water mark (``/proc/self/clear_refs``), so the peak covers the phase only; ``delta`` is that
    peak minus the RSS at the reset, i.e. the memory the phase's steps needed on top of what was
    already live (Python, libraries, model, images, optimiser state).
    """

    device: torch.device
    baseline: int = 0
    reset_ok: bool = True
    notes: list[str] = field(default_factory=list)

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        # Memory that earlier steps freed stays resident in malloc's arenas and would hide the next
        # steps' peak; hand it back to the kernel first, so the baseline is the live set.
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            self.notes.append("malloc_trim unavailable: memory freed before the phase may hide part of its peak")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.reset_ok = False
        self.baseline = _proc_status_bytes("VmRSS") or 0

    def read(self) -> dict:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            kind = "cuda max_memory_allocated"
        else:
            peak = _proc_status_bytes("VmHWM") or 0
            kind = "peak RSS (VmHWM)" + ("" if self.reset_ok else ", since process start")
        return {"kind": kind, "peak_mib": peak / MIB, "baseline_mib": self.baseline / MIB,
                "delta_mib": max(0, peak - self.baseline) / MIB, "notes": self.notes}


def summarise(seconds: list[float]) -> dict:
    """Median and spread of per-step times."""
    ordered = sorted(seconds)
    quartiles = stats.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_s": stats.median(ordered), "p25_s": quartiles[0], "p75_s": quartiles[2],
            "min_s": ordered[0], "max_s": ordered[-1], "steps": len(ordered)}


def environment(device: torch.device) -> dict:
    """What the figures were measured on."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


def configure_threads(threads: int | None, device: torch.device) -> None:
    """One intra-op thread by default on CPU: oversubscribed cores make multi-threaded timings erratic."""
    if threads is None and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats get 3-4 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def pooled(values_by_seed: dict[int, list[float]]) -> dict:
    """Mean and population std over every (seed, trial) value, and each seed's mean."""
    values = [value for trials in values_by_seed.values() for value in trials]
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((value - mean) ** 2 for value in values) / len(values)),
            "seed_means": {seed: sum(trials) / len(trials) for seed, trials in values_by_seed.items()},
            "values": len(values)}


def paired_difference(first: dict[int, dict[int, float]], second: dict[int, dict[int, float]],
                      confidence: float = 0.95) -> dict | None:
    """``first`` − ``second``, each ``{distillation seed: {probe seed: accuracy}}``, paired on both seeds.

    Each seed's trials are paired on their probe seed and averaged into one difference per distillation seed; the
    interval is Student's t over those per-seed differences (seeds − 1 degrees of freedom). The seed, not the trial,
    is the unit: a seed's trials share its distilled images, so a t over all seed x trial pairs would count the
    distillation's own variation once per trial and give too narrow an interval exactly where the question is
    whether another seed would move the lead. ``low``/``high`` are None with one seed; None without a shared pair.
    """
    from scipy.stats import t

    per_seed = {}
    for seed in sorted(first.keys() & second.keys()):
        shared = sorted(first[seed].keys() & second[seed].keys())
        if shared:
            per_seed[seed] = sum(first[seed][probe] - second[seed][probe] for probe in shared) / len(shared)
    if not per_seed:
        return None
    differences = list(per_seed.values())
    count = len(differences)
    mean = sum(differences) / count
    low = high = None
    if count > 1:
        spread = math.sqrt(sum((value - mean) ** 2 for value in differences) / (count - 1))
        half = float(t.ppf(0.5 + confidence / 2, count - 1)) * spread / math.sqrt(count)
        low, high = mean - half, mean + half
    pairs = sum(len(first[seed].keys() & second[seed].keys()) for seed in per_seed)
    return {"mean": mean, "low": low, "high": high, "per_seed": per_seed, "seeds": count, "pairs": pairs}


def excludes_zero(difference: dict | None) -> bool:
    """A paired difference whose interval lies wholly on one side of 0."""
    return bool(difference and difference["low"] is not None and (difference["low"] > 0 or difference["high"] < 0))


def print_json_last(payload: dict) -> None:
    """The final line of output: one JSON object (machine-readable figures)."""
    print(json.dumps(payload, default=float), flush=True)


# ---------------------------------------------------------------------------------------------
# The digits demo setting with two tiny backbones (quality benchmarks: ci_projector.py, multi_backbone.py).


def digits_assets(root: Path) -> tuple[str, str, str]:
    """The demo's digits dataset and tiny ViT (A: hidden 64, seed 0), plus a second tiny ViT pre-trained the same
    way with another seed and size (B: hidden 48, seed 1); built once under ``root``."""
    from sfm_hf.demo import build_tiny_vit, prepare_demo_assets

    dataset, first = prepare_demo_assets(root)
    second = root / "tiny-vit-b"
    if not (second / "preprocessor_config.json").is_file():
        build_tiny_vit(second, seed=1, hidden_size=48)
    return str(dataset), str(first), str(second)


def digits_parser(description: str):
    """The options the digits quality benchmarks share."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_CACHE / "digits", help="Assets and runs (reused).")
    parser.add_argument("--ipcs", default="1,10", help="Images per class to measure, comma-separated.")
    parser.add_argument("--trials", type=int, default=5, help="evaluate.trials.")
    parser.add_argument("--distill-iterations", type=int, default=None,
                        help="distill.iterations (default: the demo recipe's); runs are reused only at the same value.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="Make the last output line one JSON object.")
    return parser


def digits_config(root: Path, backbone, ipc: int, iterations: int | None = None):
    """The demo recipe (``sfm_hf.demo.demo_config``) for ``backbone`` (a name or a list) at ``ipc``, in a run
    folder under ``root/runs`` named after them (so the benchmarks share runs)."""
    from sfm_hf.demo import demo_config
    from sfm_hf.names import short_name

    config = demo_config(root)
    config.backbone, config.ipc = backbone, ipc
    if iterations:
        config.distill.iterations = iterations
    names = "+".join(short_name(name) for name in config.backbones)
    config.output_dir = str(root / "runs" / f"{names}-ipc{ipc}-steps{config.distill.iterations}")
    return config


def ensure_distilled(config, accelerator) -> None:
    """Stages I and II of ``config`` unless its synthetic set exists already (reruns reuse them)."""
    from sfm_hf.runner import run_stages

    if (Path(config.output_dir) / "synthetic" / "synthetic.json").is_file():
        return
    config.stages = ["statistics", "distill"]
    config.validate()
    run_stages(config, accelerator)


def evaluate_records(config, accelerator, **options) -> list[dict]:
    """Stage III of ``config`` with ``evaluate.<key>`` overrides; its records."""
    from sfm_hf.runner import run_stages

    config.stages = ["evaluate"]
    for key, value in options.items():
        setattr(config.evaluate, key, value)
    config.validate()
    run_stages(config, accelerator)
    return json.loads((Path(config.output_dir) / "results.json").read_text())
