"""Stage II step cost as the number of classes C and the images per class (ipc) grow, for SFM and LGM.

SFM's step touches only the C x ipc synthetic images and the C x D class statistics, so its
cost does not depend on the real dataset at all; LGM's step also reads, augments and encodes
a real batch of ipc x aug_rounds images of every class, which grows with C. Each point is a
fresh ``distill_cost.py --json`` process, so every peak-memory figure is that point's own.

    python benchmarks/scaling.py                                  # CPU, tiny backbone, a few minutes
    python benchmarks/scaling.py --backbone vit-b14 --classes 10,100,1000 --ipcs 1,10 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import DEFAULT_CACHE, markdown_table, print_json_last

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="distill_cost.py --backbone.")
    parser.add_argument("--classes", default="10,100,1000", help="Values of C for the class sweep (ipc 1).")
    parser.add_argument("--ipcs", default="1,2,4", help="Values of ipc for the ipc sweep.")
    parser.add_argument("--ipc-classes", type=int, default=10, help="C used in the ipc sweep.")
    parser.add_argument("--methods", default="sfm,lgm", help="Methods to measure.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per point.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per point.")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers for LGM's real stream.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true", help="Make the last output line one JSON object.")
    return parser.parse_args(argv)


def measure_point(args: argparse.Namespace, method: str, num_classes: int, ipc: int) -> dict:
    command = [
        sys.executable, str(HERE / "distill_cost.py"), "--json", "--method", method,
        "--num-classes", str(num_classes), "--ipc", str(ipc), "--backbone", args.backbone,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision,
        "--num-workers", str(args.num_workers), "--device", args.device, "--cache-dir", str(args.cache_dir),
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{method} C={num_classes} ipc={ipc} failed:\n{finished.stderr[-3000:]}")
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    result = report["results"][method]
    return {"sweep": None, "num_classes": num_classes, "ipc": ipc, "environment": report["environment"],
            "step_mib": result["memory"]["delta_mib"], "peak_mib": result["memory"]["peak_mib"],
            "memory_kind": result["memory"]["kind"], **result}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    methods = args.methods.split(",")
    points = [("C", int(c), 1) for c in args.classes.split(",")]
    points += [("ipc", args.ipc_classes, int(i)) for i in args.ipcs.split(",")]
    rows = []
    for sweep, num_classes, ipc in points:
        for method in methods:
            print(f"{method}: C={num_classes}, ipc={ipc} ...", flush=True)
            row = measure_point(args, method, num_classes, ipc)
            row["sweep"] = sweep
            rows.append(row)
    by_point = {(r["sweep"], r["num_classes"], r["ipc"], r["method"]): r for r in rows}
    for row in rows:
        sfm = by_point.get((row["sweep"], row["num_classes"], row["ipc"], "sfm"))
        if row["method"] == "lgm" and sfm is not None:
            row["time_vs_sfm"] = row["median_s"] / sfm["median_s"]
    environment = rows[0]["environment"]
    print(f"\n{environment['device']} ({environment['device_type']}, torch {environment['torch']}, "
          f"{environment['torch_threads']} thread(s)); backbone {args.backbone}, "
          f"mixed_precision={args.mixed_precision}, {args.steps} steps after {args.warmup}; "
          f"memory: {rows[0]['memory_kind']}")
    print(markdown_table(rows, [
        ("sweep", "sweep"), ("num_classes", "C"), ("ipc", "ipc"), ("method", "method"),
        ("synthetic_images", "synthetic images"), ("real_images_per_step", "real images/step"),
        ("backbone_images_per_step", "backbone images/step"), ("median_s", "s/step (median)"),
        ("projected_5000_steps_min", "5000 steps (min)"), ("step_mib", "step MiB"), ("time_vs_sfm", "lgm/sfm time"),
    ]))
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = {"benchmark": "scaling", "config": config, "environment": environment,
              "points": [{k: v for k, v in row.items() if k != "environment"} for row in rows]}
    if args.json:
        print_json_last(report)
    return report


if __name__ == "__main__":
    main()
