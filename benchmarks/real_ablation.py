"""What else belongs to us on real data: the paper's Stage II choices, one change at a time (issue #10).

Each variant is an SFM run at ipc 1 from the start ``make bench-real`` chose (centroids), one setting changed
from the benchmark's ipc 1 defaults (300 steps, a pyramid level every 40, colour-decorrelated pyramid, one
augmentation round with Gaussian noise p 0.5, mean 0, lr 0.002): the schedule, the parameterisation, the
augmentation, the start (issue #22: centroids blended with noise, a random image, the paper's noise start with
its full 5000-step schedule) and the learning rate. Each is scored as its start selection scores (on
``validation``, vanilla probe, its trials and view bank). The test split plays no part. Beside it, how far the
images drifted into colour, which MNIST (grey) never has: the mean over pixels of the standard deviation across
R, G, B. Reuses the Stage I folders of ``make bench-real`` (``<runs>/<network>/statistics``; ``real_bench.py
--selection-only`` is enough to make them).

    python benchmarks/real_ablation.py                       # every variant, both networks
    python benchmarks/real_ablation.py --variants baseline,steps-1000 --networks mobilenet_v2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import markdown_table  # noqa: E402
from real_bench import BACKBONES, REPO, Launcher, build_parser, recipe, score_on_validation  # noqa: E402

VARIANTS = {
    "baseline": ("the benchmark's settings", []),
    "steps-100": ("100 steps, a level every 13", ["--distill.iterations", "100", "--distill.pyramid_every", "13"]),
    "steps-1000": ("1000 steps, a level every 133", ["--distill.iterations", "1000", "--distill.pyramid_every", "133"]),
    "steps-1000-every-40": ("1000 steps, a level every 40 (full size from step 200)",
                            ["--distill.iterations", "1000", "--distill.pyramid_every", "40"]),
    "no-decorrelation": ("pyramid without colour decorrelation", ["--distill.decorrelate", "false"]),
    "pixels": ("pixel parameterisation (no pyramid)", ["--distill.representation", "pixel"]),
    "no-noise": ("no Gaussian-noise augmentation", ["--distill.noise_p", "0"]),
    "noise-mean-0.5": ("noise mean 0.5 (the authors' code)", ["--distill.noise_mean", "0.5"]),
    "aug-rounds-4": ("4 augmentation rounds per step", ["--distill.aug_rounds", "4"]),
    # The start (issue #22): at ipc 1 `nearest` is the centroids image (the same run), so it is not listed.
    "init-centroids-noise-0.25": ("start: centroid image blended with 25 % noise",
                                  ["--distill.init", "centroids_noise", "--distill.init_noise", "0.25"]),
    "init-centroids-noise-0.5": ("start: centroid image blended with 50 % noise",
                                 ["--distill.init", "centroids_noise", "--distill.init_noise", "0.5"]),
    "init-random": ("start: a random real image", ["--distill.init", "random"]),
    "init-noise-paper": ("start: noise with the paper's schedule (5000 steps, a level every 200)",
                         ["--distill.init", "noise", "--distill.iterations", "5000", "--distill.pyramid_every", "200"]),
    # The step size of a data-aware start (the benchmark's is the paper's 0.002).
    "lr-0.001": ("distill.lr 0.001", ["--distill.lr", "0.001"]),
    "lr-0.005": ("distill.lr 0.005", ["--distill.lr", "0.005"]),
}


def colour(run: Path) -> float:
    from safetensors.torch import load_file

    images = load_file(str(run / "synthetic" / "images.safetensors"))["images"].float()
    return images.std(dim=1).mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "real",
                        help="make bench-real's run folders (Stage I is read there); variants go to <runs>/ablation.")
    parser.add_argument("--networks", default=",".join(BACKBONES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Of {','.join(VARIANTS)}.")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="accelerate",
                        help="As real_bench.py's: inprocess saves each run's interpreter start on a busy machine.")
    bench = build_parser().parse_args([])
    parser.add_argument("--max-samples", type=int, default=bench.max_samples,
                        help="data.max_samples_per_split (bench-real's default).")
    args = parser.parse_args(argv)
    steps, every = bench.steps_ipc1.split(",")
    settings = ["--data.max_samples_per_split", str(args.max_samples), "--ipc", "1", "--distill.iterations", steps,
                "--distill.pyramid_every", every, "--evaluate.view_bank", str(bench.view_bank_ipc1),
                "--distill.init", "centroids"]
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    os.chdir(REPO)
    launch = Launcher(args.launcher, None)
    rows = []
    for network in args.networks.split(","):
        base = args.runs / network
        if not (base / "statistics" / "statistics.safetensors").is_file():
            raise SystemExit(f"no Stage I in {base}: run `python benchmarks/real_bench.py --selection-only` first")
        for name in args.variants.split(","):
            summary, overrides = VARIANTS[name]
            run = args.runs / "ablation" / network / name
            # The variant's overrides come last, so they replace the benchmark's settings.
            scored = score_on_validation(launch, base, run, ["--config", recipe(network), *settings, *overrides],
                                         bench.selection_trials)
            rows.append({"network": network, "variant": f"{name}: {summary}", "steps": scored["steps"],
                         "acc": f"{100 * scored['validation_mean']:.1f} ± {100 * scored['validation_std']:.1f}",
                         "flow": f"{scored['flow_initial']:.3f} → {scored['flow_final']:.3f}",
                         "s_step": scored["s_per_step"], "colour": f"{colour(run):.3f}"})
    table = markdown_table(rows, [("network", "network"), ("variant", "variant"), ("steps", "steps"),
                                  ("acc", "validation acc. (vanilla, %)"), ("flow", "cos(F*, flow) start → end"),
                                  ("colour", "colour (RGB std)"), ("s_step", "s/step")])
    (args.runs / "ablation" / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
