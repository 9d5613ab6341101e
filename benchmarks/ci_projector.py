"""Classifier inheritance: the SGD projector (Eq. 10) against the closed-form ridge projector.

On the digits demo setting with two tiny ViTs (A: the demo's, hidden 64; B: hidden 48, another
seed), for ipc 1 and 10: each backbone distils its own SFM set (the demo recipe), then CI is
trained on it for every (eval backbone, distill backbone) pair, same-backbone and cross-backbone,
with ``evaluate.projector: sgd`` and ``ridge``. Prints accuracy (mean +- std over the trials) and
seconds per projector fit (including the backbone forwards of its augmented views).

    python benchmarks/ci_projector.py                 # CPU, reuses runs under --root
    python benchmarks/ci_projector.py --ipcs 1 --trials 3
"""

from __future__ import annotations

import argparse

from harness import (configure_threads, digits_assets, digits_config, digits_parser, ensure_distilled,
                     evaluate_records, markdown_table, print_json_last)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = digits_parser(__doc__)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    from accelerate import Accelerator

    from sfm_hf.names import short_name

    args = parse_args(argv)
    configure_threads(args.threads, torch.device("cpu"))
    accelerator = Accelerator(cpu=True)
    _, first, second = digits_assets(args.root)
    rows = []
    for ipc in [int(value) for value in args.ipcs.split(",")]:
        for distill, other in ((first, second), (second, first)):
            ensure_distilled(digits_config(args.root, distill, ipc, args.distill_iterations), accelerator)
            for projector in ("sgd", "ridge"):
                config = digits_config(args.root, distill, ipc, args.distill_iterations)
                config.eval_backbones = [distill, other]
                records = evaluate_records(config, accelerator, projector=projector, train_sets=["sfm"],
                                           modes=["ci"], full_dataset=False, trials=args.trials)
                for record in records:
                    if record["mode"] != "ci":
                        continue
                    rows.append({
                        "ipc": ipc, "distill": short_name(distill), "eval": short_name(record["eval_backbone"]),
                        "pair": "same" if record["eval_backbone"] == distill else "cross",
                        "projector": projector, "accuracy": 100 * record["mean"], "std": 100 * record["std"],
                        "seconds": record["seconds"] / record["trials"], "lambda": record.get("ridge_lambda"),
                        "golden": None,
                    })
                golden = next(r for r in records if r["mode"] == "golden")["mean"]
                for row in rows:
                    if row["distill"] == short_name(distill) and row["ipc"] == ipc:
                        row["golden"] = 100 * golden
    print(markdown_table(rows, [("ipc", "ipc"), ("distill", "distill (golden)"), ("eval", "eval"), ("pair", "pair"),
                                ("projector", "projector"), ("accuracy", "CI acc %"), ("std", "± std"),
                                ("seconds", "s / fit"), ("golden", "golden acc %")]))
    if args.json:
        print_json_last({"rows": rows})
    return rows


if __name__ == "__main__":
    main()
