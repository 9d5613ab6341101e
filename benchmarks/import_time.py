"""Start-up cost of the command line: wall seconds of fresh interpreters that import sfm_hf or answer --help.

Each command runs ``--repeats`` times in a new process (alternating, so a drift of a shared machine
hits all alike); the table gives the minimum (the cost itself) and the median (what a user waits
on this machine now). A reference row times ``import torch, transformers`` at the same load.

    python benchmarks/import_time.py                               # this checkout (its src/ and recipes/)
    python benchmarks/import_time.py --checkout /path/to/other/worktree    # another version, e.g. before a change
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def commands(checkout: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": ["-c", "pass"],
        "import sfm_hf": ["-c", "import sfm_hf"],
        "recipes/distill.py --help": [str(checkout / "recipes" / "distill.py"), "--help"],
        "python -m sfm_hf --help": ["-m", "sfm_hf", "--help"],
        "import torch, transformers (reference)": ["-c", "import torch, transformers"],
    }


def environment(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout / "src"), "HF_HUB_OFFLINE": "1"}


def time_once(arguments: list[str], checkout: Path) -> float | None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *arguments], capture_output=True, cwd=checkout, env=environment(checkout))
    seconds = time.perf_counter() - start
    return seconds if result.returncode == 0 else None


def probe(code: str, checkout: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=checkout,
                            env=environment(checkout))
    return result.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=REPO, help="Repository root whose src/ is measured.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="Also print one JSON object as the last line.")
    args = parser.parse_args(argv)

    checkout = args.checkout.resolve()
    samples: dict[str, list[float]] = {name: [] for name in commands(checkout)}
    for _ in range(args.repeats):
        for name, arguments in commands(checkout).items():
            seconds = time_once(arguments, checkout)
            if seconds is not None:
                samples[name].append(seconds)
    where = probe("import sfm_hf; print(sfm_hf.__file__)", checkout)
    print(f"sfm_hf from {where}; {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}, "
          f"{args.repeats} repeats")
    print("| command | min s | median s |\n|---|---|---|")
    report = {}
    for name, values in samples.items():
        if not values:
            print(f"| {name} | (fails here) | |")
            continue
        report[name] = {"min": min(values), "median": statistics.median(values)}
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} |")
    heavy = probe("import sys, sfm_hf; print(' '.join(m for m in ('torch', 'transformers', 'datasets', "
                  "'accelerate') if m in sys.modules))", checkout).split()
    print(f"Modules loaded by `import sfm_hf`: {', '.join(heavy) if heavy else 'none of torch/transformers/datasets/accelerate'}")
    if args.json:
        print(json.dumps({"sfm_hf": where, "seconds": report, "heavy_modules": heavy}))


if __name__ == "__main__":
    main()
