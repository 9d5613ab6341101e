"""Cross-network classifier inheritance on real data (issue #22, part 3): which projector fit helps, on `validation`.

The real cells of `make bench-real` at 112 px: MNIST distilled with ImageNet MobileNetV2 or EfficientNet-Lite0, ipc 1
and 10. Per distillation network and ipc:

1. Stage I (``eval_split: validation``) and SFM from the recipe's start (``recipes/real_mnist_<net>.yaml``, schedule
   of ``real_bench.py``), through ``recipes/distill.py`` with real_bench's launcher.
2. Stage III on ``validation`` (never ``test``) through both networks: the same network and the other one as eval
   backbone (Table 4's cross cells), modes vanilla, ci and fused, once per projector variant: ``evaluate.projector``
   sgd or ridge (penalty chosen by ``ridge_choice`` folds or validation), ``evaluate.projector_anchors`` 0 (the
   paper's Eq. 10 alone) or 1 (class-mean anchors: real ones through the other network). The fused weight, the
   ridge penalty's validation choice and those anchors read real train features through the evaluation network, so
   every run sets ``evaluate.real_eval_data`` and its rows carry that label.

The variants differ only in the projector options, so they are evaluated in this process on one load of Stage III's
inputs (feature caches, golden classifier, synthetic set), and each trial's view bank is forwarded once and shared by
all variants, as the modes of one run share it (same seed and images, so the very same views). The vanilla head is
the same in every variant; fused re-trains nothing but reuses the trial's vanilla head and CI projector.

Writes ``<runs>/real_ci.md`` (the table, also printed) and ``<runs>/real_ci.json`` (every record of every variant).

    python benchmarks/real_ci.py --assets outputs/real-assets --launcher inprocess --ipcs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import configure_threads, markdown_table  # noqa: E402
from real_bench import BACKBONES, REPO, Launcher, copy_statistics, recipe  # noqa: E402

# name -> evaluate.* options of the projector fit.
VARIANTS = {
    "sgd, no anchors": {"projector": "sgd", "projector_anchors": 0.0},
    "sgd, anchors": {"projector": "sgd", "projector_anchors": 1.0},
    "ridge (folds), no anchors": {"projector": "ridge", "ridge_choice": "folds", "projector_anchors": 0.0},
    "ridge (folds), anchors": {"projector": "ridge", "ridge_choice": "folds", "projector_anchors": 1.0},
    "ridge (validation), no anchors": {"projector": "ridge", "ridge_choice": "validation", "projector_anchors": 0.0},
    "ridge (validation), anchors": {"projector": "ridge", "ridge_choice": "validation", "projector_anchors": 1.0},
}


def model_folder(args, backbone: str) -> str:
    return str(args.assets / f"{backbone}-{args.image_size}px")


def prepare_cell(args, launch: Launcher, backbone: str, ipc: int) -> Path:
    """Stage I of ``backbone`` (once) and its SFM images at ``ipc``; returns the folder holding both."""
    root = args.runs / backbone
    data = ["--config", recipe(backbone), "--dataset", str(args.assets / "mnist"), "--backbone",
            model_folder(args, backbone), "--eval_backbones", "[]", "--data.max_samples_per_split",
            str(args.max_samples), *args.overrides]
    if not (root / "statistics" / "statistics.safetensors").is_file():
        launch([*data, "--output_dir", str(root), "--stages", "statistics", "--eval_split", "validation"])
    run = root / f"ipc{ipc}"
    copy_statistics(root, run)
    if not (run / "synthetic" / "synthetic.json").is_file():
        steps, every = args.steps[ipc]
        launch([*data, "--output_dir", str(run), "--stages", "distill", "--ipc", str(ipc),
                "--distill.iterations", str(steps), "--distill.pyramid_every", str(every),
                "--distill.syn_res", "auto"])
    return run


def evaluate_variants(args, backbone: str, ipc: int, run: Path, variants: list[str], records: list[dict]) -> None:
    """Adds the records of ``variants`` on ``validation``, through ``backbone`` and the other networks, to
    ``records`` (saved after each variant)."""
    from accelerate import Accelerator

    import sfm_hf.evaluation as stage
    from sfm_hf.config import parse_config

    others = [model_folder(args, other) for other in args.backbones if other != backbone]
    config = parse_config([
        "--config", recipe(backbone), "--dataset", str(args.assets / "mnist"), "--backbone",
        model_folder(args, backbone), "--eval_backbones", ",".join([model_folder(args, backbone), *others]),
        "--data.max_samples_per_split", str(args.max_samples), "--output_dir", str(run), "--stages", "evaluate",
        "--eval_split", "validation", "--ipc", str(ipc), "--evaluate.train_sets", "sfm",
        "--evaluate.modes", "vanilla,ci,fused", "--evaluate.real_eval_data", "true", "--evaluate.full_dataset",
        "false", "--evaluate.trials", str(args.trials), "--evaluate.view_bank", str(args.view_bank[ipc]),
        "--evaluate.curve_points", "0",
        *args.overrides,
    ])
    shared = args.runs / backbone / "ipc1" / "evaluation" / "features"
    if ipc != 1 and shared.is_dir() and not (run / "evaluation" / "features").exists():
        shutil.copytree(shared, run / "evaluation" / "features")  # the other network's passes, made once
    accelerator = Accelerator(cpu=True)
    inputs = stage.load_inputs(config, accelerator)
    banks: dict = {}
    fresh_bank = stage.trial_bank

    def shared_bank(options, images, seed, *rest, train_set, **keywords):
        key = (train_set, seed)
        if key not in banks:
            banks[key] = fresh_bank(options, images, seed, *rest, train_set=train_set, **keywords)
        return banks[key]

    stage.trial_bank = shared_bank
    try:
        for name in variants:
            options = VARIANTS[name]
            variant = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, **options))
            variant.validate()
            start = time.perf_counter()
            results = stage.run_jobs(variant, accelerator, inputs, stage.plan_jobs(variant, inputs))
            found = stage.build_records(variant, inputs.train_sets, inputs.backbones, inputs.golden,
                                        inputs.distill_evaluation, results,
                                        int(inputs.statistics.class_counts.sum()), None)
            seconds = time.perf_counter() - start
            print(f"{backbone} ipc {ipc} {name}: {seconds:.0f} s", flush=True)
            records += [{**record, "variant": name, "variant_seconds": round(seconds, 1), "ipc_cell": ipc}
                        for record in found]
            save(args, records)
    finally:
        stage.trial_bank = fresh_bank


def class_mean_reference(args) -> str:
    """The nearest-class-mean classifier of each network on its real train class means (Stage I's caches): what
    the anchors alone know, for comparison with CI + anchors."""
    import torch

    from sfm_hf.statistics import load_feature_cache

    rows = []
    for backbone in args.backbones:
        cache = args.runs / backbone / "statistics" / "features"
        if not (cache.is_dir() and any(cache.glob("eval-*"))):
            continue
        (train, train_labels, _), (evaluation, labels, _) = (load_feature_cache(cache, prefix) for prefix in ("train", "eval"))
        classes = int(train_labels.max()) + 1
        means = torch.stack([train[train_labels == c].float().mean(0) for c in range(classes)])
        correct = torch.cdist(evaluation.float(), means).argmin(1) == labels
        rows.append({"network": backbone, "ncm": f"{100 * correct.float().mean():.1f}", "train": len(train_labels),
                     "validation": len(labels)})
    return markdown_table(rows, [("network", "network"), ("ncm", "nearest real class mean (%)"),
                                 ("train", "train images"), ("validation", "validation images")])


def save(args, records: list[dict]) -> str:
    """``real_ci.json`` (every record) and ``real_ci.md`` (the tables); returns their text."""
    text = ("# Cross-network CI on MNIST (validation split)\n\n" + table(records)
            + "\n\nReference: each network's nearest-class-mean classifier on the real train class means (the "
            "anchors' information alone), validation split:\n\n" + class_mean_reference(args)
            + "\n\n`python benchmarks/real_ci.py " + shlex.join(args.argv) + "`\n")
    (args.runs / "real_ci.md").write_text(text)
    (args.runs / "real_ci.json").write_text(json.dumps(records, indent=2, default=str))
    return text


def table(records: list[dict]) -> str:
    from sfm_hf.names import short_name

    golden = {(r["ipc_cell"], r["distill_backbone"]): r["mean"] for r in records if r["mode"] == "golden"}
    rows = []
    cells = dict.fromkeys((r["ipc_cell"], r["distill_backbone"], r["eval_backbone"]) for r in records
                          if r["mode"] == "vanilla")
    for ipc, distill, evaluation in cells:
        mine = [r for r in records if (r["ipc_cell"], r["distill_backbone"], r.get("eval_backbone")) ==
                (ipc, distill, evaluation)]
        vanilla = next(r for r in mine if r["mode"] == "vanilla")
        for variant in dict.fromkeys(r["variant"] for r in mine):
            ci = next(r for r in mine if r["mode"] == "ci" and r["variant"] == variant)
            fused = next(r for r in mine if r["mode"] == "fused" and r["variant"] == variant)
            rows.append({
                "ipc": ipc, "distill": short_name(distill), "eval": short_name(evaluation),
                "pair": "same" if distill == evaluation else "cross", "variant": variant,
                "vanilla": f"{100 * vanilla['mean']:.1f} ± {100 * vanilla['std']:.1f}",
                "ci": f"{100 * ci['mean']:.1f} ± {100 * ci['std']:.1f}",
                "fused": f"{100 * fused['mean']:.1f} ± {100 * fused['std']:.1f}",
                "weights": ", ".join(f"{w:g}" for w in fused["fusion_weight"]),
                "golden": f"{100 * golden[(ipc, distill)]:.1f}",
            })
    return markdown_table(rows, [("ipc", "ipc"), ("distill", "distill (golden)"), ("eval", "eval"), ("pair", "pair"),
                                 ("variant", "projector"), ("vanilla", "SFM (vanilla)"), ("ci", "SFM+CI"),
                                 ("fused", "SFM+fused"), ("weights", "fusion w per trial"),
                                 ("golden", "golden")])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "outputs" / "real-assets",
                        help="Prepared by benchmarks/real_data.py --image-size <px> (read only).")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "real-ci", help="Run folders and the table.")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="inprocess",
                        help="How Stage I and SFM run (real_bench.Launcher); Stage III always runs in this process.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1).")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help="Distillation networks; each is an eval backbone of the others (the cross cells).")
    parser.add_argument("--image-size", type=int, default=112, help="Input side of the prepared model folders.")
    parser.add_argument("--ipcs", default="1,10")
    parser.add_argument("--max-samples", type=int, default=2000, help="data.max_samples_per_split (train, validation).")
    parser.add_argument("--steps-ipc1", default="300,40", help="distill.iterations,pyramid_every at ipc 1.")
    parser.add_argument("--steps-ipc10", default="100,15", help="distill.iterations,pyramid_every at ipc 10.")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--view-bank-ipc1", type=int, default=64)
    parser.add_argument("--view-bank-ipc10", type=int, default=32)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="Projector variants to run, of: " + "; ".join(VARIANTS) + " (';'-separated).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Further override for every run, e.g. --set evaluate.iterations=600 (repeatable).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.overrides = [f"--{pair}" for pair in args.set]
    args.backbones = args.backbones.split(",")
    args.steps = {1: tuple(map(int, args.steps_ipc1.split(","))), 10: tuple(map(int, args.steps_ipc10.split(",")))}
    args.view_bank = {1: args.view_bank_ipc1, 10: args.view_bank_ipc10}
    args.assets, args.runs = args.assets.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    import torch

    os.chdir(REPO)
    configure_threads(args.threads, torch.device("cpu"))  # Stage III runs here whatever the launcher
    start = time.perf_counter()
    launch = Launcher(args.launcher, args.threads)
    # Records of an earlier call are kept: a variant already measured for a cell is not run again.
    stored = args.runs / "real_ci.json"
    records: list[dict] = json.loads(stored.read_text()) if stored.is_file() else []
    for ipc in map(int, args.ipcs.split(",")):
        for backbone in args.backbones:
            done = {r["variant"] for r in records if r["ipc_cell"] == ipc and r["distill_backbone"].endswith(
                f"/{backbone}-{args.image_size}px")}
            todo = [name for name in args.variants.split(";") if name not in done]
            if not todo:
                continue
            run = prepare_cell(args, launch, backbone, ipc)
            evaluate_variants(args, backbone, ipc, run, todo, records)
    print(save(args, records))
    print(f"real_ci: {time.perf_counter() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
