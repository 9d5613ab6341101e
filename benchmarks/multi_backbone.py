"""One synthetic set for two backbones (``backbone: [A, B]``) against each backbone's own set.

On the digits demo setting with two tiny ViTs (A: the demo's, hidden 64; B: hidden 48, another
seed), for each ipc: the SFM sets distilled for A alone, for B alone and jointly for [A, B] (the
demo recipe, same steps). For every set and backbone it prints the flow cosine cos(F*, flow of
the set) on that backbone's statistics, and the vanilla and CI accuracy of a head trained on the
set through that backbone (Table 4 style: a single set on the other backbone is a cross row; CI
then uses the distillation backbone's golden classifier, the joint set uses the golden classifier
of the backbone it is evaluated on, as both were distilled for it).

    python benchmarks/multi_backbone.py               # CPU, reuses runs under --root
    python benchmarks/multi_backbone.py --ipcs 1 --trials 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import (configure_threads, digits_assets, digits_config, digits_parser, ensure_distilled,
                     evaluate_records, markdown_table, print_json_last)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = digits_parser(__doc__)
    parser.add_argument("--projector", choices=("sgd", "ridge"), default="sgd", help="evaluate.projector for CI.")
    return parser.parse_args(argv)


def flow_cosines(synthetic_dir: Path, backbones: dict[str, str], statistics_dirs: dict[str, Path]) -> dict[str, float]:
    """cos(F*, flow of the set) on each backbone's statistics (no augmentation), as Stage II reports it."""
    from sfm_hf.backbones import load_backbone
    from sfm_hf.distill.outputs import flow_agreement
    from sfm_hf.evaluation import load_synthetic
    from sfm_hf.statistics import Statistics

    synthetic = load_synthetic(synthetic_dir)
    return {
        label: flow_agreement(load_backbone(name), synthetic.images, synthetic.labels,
                              Statistics.load(statistics_dirs[label]))
        for label, name in backbones.items()
    }


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    from accelerate import Accelerator

    args = parse_args(argv)
    configure_threads(args.threads, torch.device("cpu"))
    accelerator = Accelerator(cpu=True)
    _, first, second = digits_assets(args.root)
    backbones = {"A": first, "B": second}
    rows = []
    for ipc in [int(value) for value in args.ipcs.split(",")]:
        distilled_for = {"A": first, "B": second, "A+B": [first, second]}
        configs = {label: (lambda name=name: digits_config(args.root, name, ipc, args.distill_iterations))
                   for label, name in distilled_for.items()}
        runs = {label: Path(make().output_dir) for label, make in configs.items()}
        for label in runs:
            ensure_distilled(configs[label](), accelerator)
        statistics_dirs = {label: runs[label] / "statistics" for label in ("A", "B")}
        options = dict(projector=args.projector, train_sets=["sfm"], modes=["vanilla", "ci"], full_dataset=False,
                       trials=args.trials)
        accuracies = {}
        for label in ("A", "B"):
            config = configs[label]()
            config.eval_backbones = [first, second]
            for record in evaluate_records(config, accelerator, **options):
                accuracies[(label, record["eval_backbone"], record["mode"])] = record
        for record in evaluate_records(configs["A+B"](), accelerator, **options):
            accuracies[("A+B", record["eval_backbone"], record["mode"])] = record
        for label, run in runs.items():
            cosines = flow_cosines(run / "synthetic", backbones, statistics_dirs)
            for on, name in backbones.items():
                vanilla, ci = accuracies[(label, name, "vanilla")], accuracies[(label, name, "ci")]
                rows.append({
                    "ipc": ipc, "set": label, "on": on, "row": "own" if on in label else "cross",
                    "flow_cosine": cosines[on],
                    "vanilla": 100 * vanilla["mean"], "vanilla_std": 100 * vanilla["std"],
                    "ci": 100 * ci["mean"], "ci_std": 100 * ci["std"],
                    "golden_of": on if label == "A+B" else label,
                })
    print(markdown_table(rows, [("ipc", "ipc"), ("set", "set distilled for"), ("on", "backbone"), ("row", "row"),
                                ("flow_cosine", "flow cos"), ("vanilla", "vanilla %"), ("vanilla_std", "±"),
                                ("ci", "CI %"), ("ci_std", "±"), ("golden_of", "CI golden of")]))
    if args.json:
        print_json_last({"rows": rows})
    return rows


if __name__ == "__main__":
    main()
