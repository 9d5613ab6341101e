"""Merged statistics vs one pass: Stage I on the whole digits train split and on K disjoint shards of it, the
shards merged with ``sfm_hf.merge``, and the largest differences printed.

    .venv/bin/python benchmarks/merge_check.py              # 2 halves
    .venv/bin/python benchmarks/merge_check.py --shards 3 --json

Uses the demo's assets (real scikit-learn digits, the tiny pre-trained ViT; built once under
outputs/demo-assets), so it runs offline on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def stage_one(recipe, dataset: Path, output: Path) -> Path:
    """Stage I of the demo recipe on ``dataset``; returns its statistics folder."""
    import copy

    from accelerate import Accelerator

    from sfm_hf.runner import run_stages

    config = copy.deepcopy(recipe)
    config.dataset, config.output_dir, config.stages = str(dataset), str(output), ["statistics"]
    run_stages(config, Accelerator(cpu=True))
    return output / "statistics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2, help="disjoint consecutive slices of the train split")
    parser.add_argument("--assets", default="outputs/demo-assets", help="where the demo's dataset and backbone live")
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    arguments = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from sfm_hf.demo import demo_config, split_train_split
    from sfm_hf.merge import merge_statistics
    from sfm_hf.utils import quiet_libraries

    quiet_libraries()
    recipe = demo_config(arguments.assets)
    dataset = Path(recipe.dataset)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        whole = stage_one(recipe, dataset, scratch / "whole")
        shards = [
            stage_one(recipe, part, scratch / f"run-{part.name}")
            for part in split_train_split(dataset, arguments.shards, scratch / "parts")
        ]
        start = time.perf_counter()
        merged_statistics = merge_statistics(shards, scratch / "merged")
        merge_seconds = time.perf_counter() - start
        one = load_file(whole / "statistics.safetensors")
        merged = load_file(scratch / "merged" / "statistics.safetensors")
        golden_one = json.loads((whole / "golden_classifier.json").read_text())
        golden_merged = json.loads((scratch / "merged" / "golden_classifier.json").read_text())
        result = {
            "shards": arguments.shards,
            "images_per_shard": [json.loads((s / "statistics.json").read_text())["images_seen"] for s in shards],
            "counts_equal": bool(torch.equal(one["class_counts"], merged["class_counts"])),
            "classes": merged_statistics.num_classes,
            "feature_dim": merged_statistics.feature_dim,
            "max_abs_diff_class_sums": float((one["class_sums"] - merged["class_sums"]).abs().max()),
            "max_abs_class_sum": float(one["class_sums"].abs().max()),
            "max_abs_diff_class_means": float((one["class_means"] - merged["class_means"]).abs().max()),
            "golden_accuracy_one_pass": golden_one["eval_accuracy"],
            "golden_accuracy_merged_refit": golden_merged["eval_accuracy"],
            "eval_images": golden_merged["eval_images"],
            "merge_seconds": round(merge_seconds, 3),
        }
    print(f"Stage I on {result['images_per_shard']} images ({arguments.shards} shards) merged vs one pass over all "
          f"{sum(result['images_per_shard'])} ({result['classes']} classes x {result['feature_dim']}-d):")
    print(f"  class counts equal:            {result['counts_equal']}")
    print(f"  max |class_sums difference|:   {result['max_abs_diff_class_sums']:.3g} "
          f"(largest |sum| {result['max_abs_class_sum']:.3g})")
    print(f"  max |class_means difference|:  {result['max_abs_diff_class_means']:.3g}")
    print(f"  golden classifier accuracy:    one pass {result['golden_accuracy_one_pass']:.2%}, merged (refitted "
          f"on the shards' caches) {result['golden_accuracy_merged_refit']:.2%} on {result['eval_images']} images")
    print(f"  merge time:                    {result['merge_seconds']:.2f} s")
    if arguments.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
