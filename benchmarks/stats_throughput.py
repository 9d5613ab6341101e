"""Stage I throughput: images/s of the statistics pass on JPEG input, with decode time separated from model time.

Four measurements on a locally generated Hub-layout parquet dataset of JPEGs (default
2,000 images of 500x375 for CPU; ``--num-images 20000`` for a GPU machine):

- per-image cost in one process: JPEG decode (``load_rgb``) and resize + centre crop (``resize_center_crop``),
  at the backbone's input size and at 224 px;
- decode only: the library's loader (``image_batches``: decode + resize in DataLoader workers), no model;
- model only: already decoded uint8 batches through the backbone as Stage I feeds them, no decoding;
- end to end: ``sfm_hf.statistics.stream_features``, the Stage I pass itself (float16 feature cache included).

End to end is bounded by the slower of decode (which scales with workers) and model.

    python benchmarks/stats_throughput.py                                        # CPU, tiny backbone
    python benchmarks/stats_throughput.py --backbone vit-b14 --num-images 20000 --batch-size 256 --workers 8,16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import (
    DEFAULT_CACHE, build_backbone, configure_threads, dataset_summary, environment, make_jpeg_dataset,
    markdown_table, print_json_last, resolve_device, synchronize,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sfm_hf.backbones import load_backbone  # noqa: E402
from sfm_hf.config import DataOptions  # noqa: E402
from sfm_hf.data import as_float, image_batches, load_rgb, open_split, resize_center_crop  # noqa: E402
from sfm_hf.statistics import stream_features  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="Preset with random weights or a model folder / id.")
    parser.add_argument("--num-images", type=int, default=2000, help="Images in the generated dataset.")
    parser.add_argument("--num-classes", type=int, default=100, help="Classes in the generated dataset.")
    parser.add_argument("--image-size", default="500x375", help="WxH of the generated JPEGs.")
    parser.add_argument("--batch-size", type=int, default=64, help="data.batch_size.")
    parser.add_argument("--workers", default="0,1,2", help="data.num_workers values to measure.")
    parser.add_argument("--pin-memory", choices=("auto", "yes", "no"), default="auto",
                        help="Loader pin_memory for the decode-only pass (auto: when CUDA is available).")
    parser.add_argument("--per-image", type=int, default=200, help="Images for the per-image decode/resize cost.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU default: 1).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true", help="Make the last output line one JSON object.")
    return parser.parse_args(argv)


def resize_whole_then_crop(image: Image.Image, size: int, crop_ratio: float) -> np.ndarray:
    """The two-step resize + crop the library used before resampling only the crop's source box."""
    short = max(size, round(size / crop_ratio))
    width, height = image.size
    scale = short / min(width, height)
    new_size = (max(short, round(width * scale)), max(short, round(height * scale)))
    resized = image.resize(new_size, Image.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.array(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def per_image_costs(source, sizes: list[int], crop_ratio: float, count: int) -> list[dict]:
    """Milliseconds per image, one process, no workers: decoding, then resize + crop to each size."""
    rows = [source.dataset[i][source.image_column] for i in range(min(count, len(source.dataset)))]
    start = time.perf_counter()
    decoded = [load_rgb(value) for value in rows]
    decode_ms = 1000 * (time.perf_counter() - start) / len(rows)
    costs = []
    for size in sizes:
        timings = {}
        for name, resize in (("resize_crop_ms", resize_center_crop),
                             ("resize_whole_then_crop_ms", resize_whole_then_crop)):
            start = time.perf_counter()
            for image in decoded:
                resize(image, size, crop_ratio)
            timings[name] = 1000 * (time.perf_counter() - start) / len(rows)
        costs.append({"size": size, "decode_ms": decode_ms, **timings,
                      "images_per_s_per_worker": 1000 / (decode_ms + timings["resize_crop_ms"])})
    return costs


def decode_only(source, image_size: int, batch_size: int, workers: int, crop_ratio: float, pin: bool | None) -> float:
    start = time.perf_counter()
    seen = sum(len(batch.labels) for batch in image_batches(
        source, image_size=image_size, batch_size=batch_size, crop_ratio=crop_ratio, num_workers=workers,
        pin_memory=pin,
    ))
    return seen / (time.perf_counter() - start)


def model_only(backbone, source, image_size: int, batch_size: int, crop_ratio: float, device, batches: int) -> float:
    """Decoded batches are prepared first, then fed exactly as ``stream_features`` feeds them."""
    loader = image_batches(source, image_size=image_size, batch_size=batch_size, crop_ratio=crop_ratio)
    decoded = [batch.images for _, batch in zip(range(2), loader)]
    with torch.inference_mode():
        backbone(as_float(decoded[0].to(device)))  # warm-up
        synchronize(device)
        start = time.perf_counter()
        seen = 0
        for number in range(batches):
            images = decoded[number % len(decoded)]
            features = backbone(as_float(images.to(device, non_blocking=True)))
            features.half().cpu()
            seen += len(images)
        synchronize(device)
    return seen / (time.perf_counter() - start)


def end_to_end(backbone, source, batch_size: int, workers: int, accelerator) -> float:
    data = DataOptions(batch_size=batch_size, num_workers=workers)
    with tempfile.TemporaryDirectory() as cache:
        feature_pass = stream_features(backbone, source, data, accelerator, cache_dir=Path(cache), prefix="train",
                                       description=f"Stage I, {workers} workers")
    return feature_pass.images_per_second


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    configure_threads(args.threads, device)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    per_class = max(1, args.num_images // args.num_classes)
    dataset = make_jpeg_dataset(args.num_classes, per_class, (width, height), cache_dir=args.cache_dir)
    backbone = load_backbone(build_backbone(args.backbone, args.cache_dir), device=device)
    source = open_split(str(dataset), "train")
    crop_ratio = DataOptions().crop_ratio
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    pin = {"auto": None, "yes": True, "no": False}[args.pin_memory]
    costs = per_image_costs(source, sorted({backbone.image_size, 224}), crop_ratio, args.per_image)
    model_rate = model_only(backbone, source, backbone.image_size, args.batch_size, crop_ratio, device,
                            batches=max(4, min(32, len(source.dataset) // args.batch_size)))
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        decode_rate = decode_only(source, backbone.image_size, args.batch_size, workers, crop_ratio, pin)
        total_rate = end_to_end(backbone, source, args.batch_size, workers, accelerator)
        rows.append({"workers": workers, "decode_images_per_s": decode_rate, "model_images_per_s": model_rate,
                     "stage1_images_per_s": total_rate,
                     "bound": "decode" if decode_rate < model_rate else "model"})
    env = environment(device)
    summary = dataset_summary(dataset)
    print(f"\n{env['device']} ({env['device_type']}, torch {env['torch']}, {env['torch_threads']} thread(s), "
          f"{env['cpu_count']} CPUs); backbone {args.backbone} ({backbone.image_size} px), batch {args.batch_size}; "
          f"{summary['images']} JPEGs {width}x{height}, mean {summary['mean_jpeg_bytes'] / 1000:.0f} kB")
    print("Per image, one process:")
    print(markdown_table(costs, [
        ("size", "crop (px)"), ("decode_ms", "JPEG decode (ms)"), ("resize_crop_ms", "resize + crop (ms)"),
        ("resize_whole_then_crop_ms", "before: resize whole, then crop (ms)"),
        ("images_per_s_per_worker", "images/s per worker"),
    ]))
    print(f"Loader and model, {summary['images']} images:")
    print(markdown_table(rows, [
        ("workers", "workers"), ("decode_images_per_s", "decode only (img/s)"),
        ("model_images_per_s", "model only (img/s)"), ("stage1_images_per_s", "Stage I end to end (img/s)"),
        ("bound", "slower part"),
    ]))
    report = {"benchmark": "stats_throughput",
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": env, "dataset": {"path": str(dataset), **summary}, "per_image": costs, "rows": rows}
    if args.json:
        print_json_last(report)
    return report


if __name__ == "__main__":
    main()
