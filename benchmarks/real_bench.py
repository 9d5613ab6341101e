"""`make bench-real`: the paper's protocol on MNIST with real networks, through our normal recipes, over seeds.

Every run is ``recipes/distill.py --config recipes/real_mnist_<key>.yaml`` plus overrides, started with
``accelerate launch`` (``--launcher accelerate``, default) or, to save the interpreter start-up of each run on a
busy machine, by calling the same script's ``main(argv)`` in this process (``--launcher inprocess``; same argv,
same code path). ``--backbones`` names the distillation networks by key (the recipe ``real_mnist_<key>.yaml``
names each one's folder, hence its input size); each is also an evaluation network of every other one, and
``--others`` adds evaluation-only networks. Per distillation network and ipc (a *cell*):

1. Stage I once per network (``eval_split: validation``), its folder copied into every run below.
2. The start, on the first seed of ``--seeds``: SFM from every start (``distill.init``: noise, centroids, nearest,
   centroids_noise, random), each scored on ``validation`` (vanilla probe); the best is chosen (or the start
   ``--final-init`` fixes in advance, e.g. the paper's noise), the test split plays no part. At ipc 1 ``nearest``
   is the ``centroids`` image and is not run again. The other seeds run the chosen start only: choosing per seed
   would multiply the cell's cost by the number of starts, and a start is a setting of the method (like its lr),
   chosen once on validation; the later seeds then measure how much another distillation of that setting moves
   the result.
3. LGM (``--lgm-ipcs``; the paper's 10 augmentation rounds, ``--lgm-steps`` from each of ``--lgm-init``) on the
   first seed, scored on validation like the starts; the final tables' LGM (from noise where it ran) is distilled
   again with every other seed. ``--ablations`` (TCDD, NCDD: the paper's Table 3) are distilled with every seed
   on SFM's schedule and start, and evaluated beside LGM.
4. Time to quality, on the first seed: every run of 2 and 3 snapshots its images ``--snapshot-points`` times and
   scores each snapshot with the run's own validation protocol; Random and Centroids are scored on validation once
   (``ipc<k>-baselines``). Per cell ``<runs>/<network>-ipc<k>/time_to_quality.png`` and a table (seconds to the
   Centroids row and to 95 % of the cell's best final accuracy); the headline "SFM reaches X % in S s; LGM reaches
   Y % in T s" compares the chosen SFM start and LGM, measured side by side in one run.
5. The final evaluation on ``test``, once per seed of ``--seeds`` (``ipc<k>-seed<s>``): Random, Centroids,
   Neighbors (of SFM and of LGM), LGM and SFM, each vanilla and CI, on the distillation network and on every other
   one, ``--trials`` probe trials of ``--final-iterations`` steps each. The run seed (``--seed``) draws the
   synthetic images' start (noise, random or k-means picks), the distillation's augmentations and LGM's random
   heads; Random's draw and each probe's initialisation and views follow ``evaluate.seed_base`` + trial, which
   the bench sets to 3407 + 1000 x seed, so every (seed, trial) is a fresh draw of the whole pipeline and the
   rows of one seed and trial share it (the pairing of the differences).

No row reads real data through an evaluation network: the bench keeps Stage III's defaults
(``evaluate.real_eval_data`` false: CI projectors anchored only on the distillation network, with Stage I's class
means on both sides; ``evaluate.protocol`` fixed, so no stopping rule reads real features). The golden classifier
(Stage I, full data) is the reference row of each network.

Every Stage III training draws its augmented views from a bank of views per train image, forwarded once per
trial (``evaluate.view_bank``: ``--view-bank-ipc1``, ``--view-bank-ipc10``); 0 gives fresh views every step, the
paper's protocol, at several times the cost.

Cost: every launch writes ``launch.json`` (wall and CPU seconds); at the end the bench reads its runs into unit
costs (a launch's fixed part, a distillation step, a validation score, a final run's trial and feature passes: CPU
seconds of one thread, ``--launcher inprocess --threads 1`` measures them) and writes ``<runs>/costs.json``. At the
start it prices the matrix it is asked for from ``--costs`` (``benchmarks/real_bench_costs.json``, a smoke run's
costs.json) and prints the estimate: the default matrix (2 CNNs x ipc 1, 10 x 3 seeds x 2 trials, the recipes'
1000-step probes) at 1.9 h of one quiet core, 2.3 h with four seeds.

The tables go to ``<runs>/summary.md`` (and are printed): per cell and evaluation network every set x {vanilla,
CI} as mean ± population std over seeds x trials beside the README's table at f7ee5c0 (``README_BEFORE``), the
paired differences SFM − Centroids, SFM − LGM, SFM+CI − Centroids+CI and SFM+CI − LGM+CI (and SFM − Random,
− TCDD, − NCDD where those rows ran) with 95 % intervals
(``harness.paired_difference``: Student's t over the per-seed means of the trial-paired differences), and which
leads are real. ``--later-seeds-only``, started beside a bench with the same options once its Stage I is
written, makes the distillations no validation choice waits for from the other end of the list: a second core.
Seconds per step come from each run's ``synthetic.json``; peak memory (in-process launcher only)
is the peak RSS of the distill stage above the memory live when it started (``harness.PeakMemory``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import real_data  # noqa: E402
from harness import PeakMemory, configure_threads, excludes_zero, markdown_table, paired_difference, pooled  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
INITS = ("noise", "centroids", "nearest", "centroids_noise", "random")
# Starts that pick the same images as another at ipc 1 (the image nearest to the class mean is the centroid).
SAME_AT_IPC1 = {"nearest": "centroids"}
FINAL_TRAIN_SETS = ("random", "centroids", "neighbors", "sfm", "lgm")
# The paper's Table 3 ablations (`--ablations`): SFM's loss split into its target / non-target centre terms.
ABLATIONS = ("tcdd", "ncdd")
MODES = "vanilla,ci"
# evaluate.seed_base of distillation seed s: SEED_BASE + SEED_STRIDE * s (the library's default for seed 0), so
# the probe seeds of different distillation seeds never meet while --trials stays below SEED_STRIDE.
SEED_BASE, SEED_STRIDE = 3407, 1000
GOLDEN = "Golden classifier (full data)"
# The unit costs behind the estimate printed at the start: a smoke run's costs.json (its command is inside).
MEASURED_COSTS = Path(__file__).with_name("real_bench_costs.json")
COMPARISONS = (("SFM", "Centroids"), ("SFM", "LGM"), ("SFM+CI", "Centroids+CI"), ("SFM+CI", "LGM+CI"))
# Shown only where both rows ran: against Random (the paper's first row) and the Table 3 ablations.
OPTIONAL_COMPARISONS = (("SFM", "Random"), ("SFM", "TCDD"), ("SFM", "NCDD"))

# The README's "Real data" table as it stood at f7ee5c0 (measured at ab9d9e6 by `make bench-real`, 2 CPU cores):
# one distillation seed, 5 probe trials (± over trials only), CI projectors anchored on real class means through
# every evaluation network (evaluate.projector_anchors 1.0), no CI rows for the real baselines, LGM at ipc 1 only.
# A historical record for the before -> after columns, not a measurement of this code.
README_BEFORE_COMMIT = "f7ee5c0"
README_BEFORE = {
    ("mobilenet_v2", 1): {
        "mobilenet_v2": {"Random": "40.1 ± 4.7", "Centroids": "54.8 ± 0.7", "LGM": "10.6 ± 0.3",
                         "LGM+CI": "71.0 ± 0.3", "SFM": "55.7 ± 0.4", "SFM+CI": "78.7 ± 0.3", GOLDEN: "86.2"},
        "efficientnet_lite0": {"SFM": "41.4", "SFM+CI": "62.8", GOLDEN: "79.8"}},
    ("efficientnet_lite0", 1): {
        "efficientnet_lite0": {"Random": "34.7 ± 1.5", "Centroids": "54.4 ± 1.3", "LGM": "9.2 ± 0.0",
                               "LGM+CI": "67.6 ± 0.6", "SFM": "56.2 ± 1.4", "SFM+CI": "73.8 ± 0.5", GOLDEN: "79.8"},
        "mobilenet_v2": {"SFM": "49.3", "SFM+CI": "67.0", GOLDEN: "86.2"}},
    ("mobilenet_v2", 10): {
        "mobilenet_v2": {"Random": "67.0 ± 1.2", "Centroids": "64.1 ± 0.5", "SFM": "69.0 ± 1.0",
                         "SFM+CI": "82.4 ± 0.3", GOLDEN: "86.2"},
        "efficientnet_lite0": {"SFM": "63.2", "SFM+CI": "63.3", GOLDEN: "79.8"}},
    ("efficientnet_lite0", 10): {
        "efficientnet_lite0": {"Random": "62.9 ± 0.4", "Centroids": "63.2 ± 0.5", "SFM": "65.8 ± 0.4",
                               "SFM+CI": "78.1 ± 0.2", GOLDEN: "79.8"},
        "mobilenet_v2": {"SFM": "67.9", "SFM+CI": "63.9", GOLDEN: "86.2"}},
}


def recipe(backbone: str) -> Path:
    return REPO / "recipes" / f"real_mnist_{backbone}.yaml"


def recipe_config(backbone: str) -> dict:
    """``backbone``'s recipe as a dict (its dataset and backbone folders, its schedule)."""
    import yaml

    path = recipe(backbone)
    if not path.is_file():
        raise SystemExit(f"error: --backbones/--others: no recipe {path.relative_to(REPO)} for {backbone!r}; "
                         f"write one (see recipes/real_mnist_{BACKBONES[0]}.yaml) or drop the key.")
    return yaml.safe_load(path.read_text())


def network_folder(args, backbone: str) -> str:
    """The prepared model folder of ``backbone``: its recipe's folder name under ``--assets``."""
    return str(args.assets / Path(recipe_config(backbone)["backbone"]).name)


def prepare_assets(args) -> None:
    """MNIST and every network's folder under ``--assets``, each at the input size its recipe's folder names
    (``benchmarks/real_data.py`` writes ``<key>-<size>px``)."""
    by_size: dict[int, list[str]] = {}
    for network in args.networks:
        folder = Path(network_folder(args, network)).name
        size = re.fullmatch(rf"{re.escape(network)}-(\d+)px", folder)
        if size is None:
            raise SystemExit(f"error: {recipe(network).relative_to(REPO)}: backbone folder {folder!r} is not "
                             f"{network}-<size>px, the name benchmarks/real_data.py gives it.")
        by_size.setdefault(int(size.group(1)), []).append(network)
    for size, networks in sorted(by_size.items()):
        print(json.dumps(real_data.prepare(args.assets, size, backbones=tuple(networks))["backbones"], indent=2))


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
        """Runs ``argv`` and writes what it cost to ``<output_dir>/launch.json``: wall and CPU seconds (the CPU
        seconds of this process or of the launched one: on a shared machine they stay near a quiet machine's wall
        time when one thread runs), peak memory (in-process only)."""
        print(f"\n$ accelerate launch recipes/distill.py {' '.join(argv)}", flush=True)
        wait_for_other_run(Path(last_value(argv, "--output_dir")))
        who = resource.RUSAGE_SELF if self._main is not None else resource.RUSAGE_CHILDREN
        start, cpu = time.perf_counter(), cpu_seconds(who)
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
        cost = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu_seconds(who) - cpu, 1),
                "memory": memory, "launcher": self.kind}
        (Path(last_value(argv, "--output_dir")) / "launch.json").write_text(json.dumps(cost))
        return cost


def wait_for_other_run(output_dir: Path) -> None:
    """Block while another process's run holds ``output_dir`` (a ``--later-seeds-only`` bench beside this one):
    once it is done, the launch finds its images made and skips the work."""
    import fcntl

    from sfm_hf.layout import LOCK_FILE

    lock = output_dir / LOCK_FILE
    if lock.is_file():
        with open(lock) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


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

    ``argv``: recipe, data, schedule, seed and start (``--distill.iterations`` among them when ``snapshots``);
    ``base`` holds the Stage I folder the run starts from. ``snapshots`` > 0: that many snapshots along the run,
    each scored alike (``evaluate.time_to_quality``; the curve goes under ``time_to_quality``).
    """
    copy_statistics(base, run)
    timed = []
    if snapshots:
        timed = ["--distill.snapshot_every", str(snapshot_every(int(last_value(argv, "--distill.iterations")),
                                                                 snapshots)),
                 "--evaluate.time_to_quality", "true"]
    if not (run / "results.json").is_file():
        launch([
            *argv, "--output_dir", str(run), "--stages", "distill,evaluate", "--eval_split", "validation",
            "--distill.method", method, "--evaluate.train_sets", method, "--evaluate.modes", "vanilla",
            "--eval_backbones", "[]", "--evaluate.full_dataset", "false", "--evaluate.trials", str(trials), *timed,
        ])
    record = vanilla_accuracy(run, method)
    scored = {"validation_mean": record["mean"], "validation_std": record["std"],
              **distill_cost(run, read_json(run / "launch.json"))}
    curves = run / "evaluation" / "time_to_quality.json"
    if curves.is_file():
        scored["time_to_quality"] = read_json(curves)["curves"][0]
    return scored


def last_value(argv: list[str], key: str) -> str:
    """The value of the last ``key`` in ``argv`` (the one the parser keeps)."""
    return argv[len(argv) - 1 - argv[::-1].index(key) + 1]


def score_baselines(launch: Launcher, base: Path, run: Path, argv: list[str], trials: int) -> list[dict]:
    """Random, Centroids and the full-dataset probe on ``validation`` with the starts' protocol: the flat lines."""
    copy_statistics(base, run)
    if not (run / "results.json").is_file():
        launch([*argv, "--output_dir", str(run), "--stages", "evaluate", "--eval_split", "validation",
                "--evaluate.train_sets", "random,centroids", "--evaluate.baseline_modes", "vanilla",
                "--eval_backbones", "[]", "--evaluate.trials", str(trials)])
    return [{key: record[key] for key in ("train_set", "mode", "eval_backbone", "mean", "std")}
            for record in read_json(run / "results.json")]


def distill_only(launch: Launcher, base: Path, run: Path, argv: list[str]) -> None:
    """Stage II alone (a later seed's LGM images), unless the run holds them already."""
    copy_statistics(base, run)
    if not (run / "synthetic" / "synthetic.json").is_file():
        launch([*argv, "--output_dir", str(run), "--stages", "distill", "--eval_split", "validation"])


def final_iterations_of(args, backbone: str) -> int:
    """The probe steps of ``backbone``'s final evaluation: ``--final-iterations`` or its recipe's."""
    option = args.final_iterations
    return int(recipe_config(backbone)["evaluate"]["iterations"] if option == "recipe" else option)


def schedule_of(option: str, backbone: str) -> tuple[int, int]:
    """(distill.iterations, distill.pyramid_every) of a ``--steps-ipc<k>`` value: "STEPS,EVERY" or "recipe"."""
    if option == "recipe":
        distill = recipe_config(backbone)["distill"]
        return int(distill["iterations"]), int(distill["pyramid_every"])
    steps, every = option.split(",")
    return int(steps), int(every)


def run_backbone(args, launch: Launcher, backbone: str, ipc: int, summary: dict) -> None:
    root = args.runs / backbone
    folder = network_folder(args, backbone)
    config = ["--config", str(recipe(backbone).relative_to(REPO)), "--backbone", folder,
              "--dataset", str(args.assets / Path(recipe_config(backbone)["dataset"]).name)]
    data = ["--data.max_samples_per_split", str(args.max_samples), *args.overrides]
    if not (root / "statistics" / "statistics.safetensors").is_file():
        launch([*config, *data, "--output_dir", str(root), "--stages", "statistics", "--eval_split", "validation"])
    common = [*data, "--evaluate.view_bank", str(args.view_bank[ipc])]
    steps, every = schedule_of(args.steps[ipc], backbone)
    schedule = ["--ipc", str(ipc), "--distill.iterations", str(steps), "--distill.pyramid_every", str(every)]
    first = args.seeds[0]
    seeded = ["--seed", str(first)]
    lgm = lgm_plan(args, backbone, ipc, root, [*config, *common])
    later = later_distillations(args, root, ipc, [*config, *common, *schedule], lgm)
    if args.later_seeds_only:
        # Beside a full bench on the same --runs: the other end of its list of independent distillations.
        for run, argv in reversed(later):
            distill_only(launch, root, run, argv)
        return
    inits = [init for init in args.inits if not (ipc == 1 and SAME_AT_IPC1.get(init) in args.inits)]
    selection = {init: score_on_validation(launch, root, root / f"ipc{ipc}-{init}",
                                           [*config, *common, *schedule, *seeded, "--distill.init", init],
                                           args.selection_trials, snapshots=args.snapshot_points)
                 for init in inits}
    chosen = (max(selection, key=lambda init: selection[init]["validation_mean"]) if args.final_init == "best"
              else args.final_init)
    entry = summary.setdefault(backbone, {})[f"ipc{ipc}"] = {"selection": selection, "chosen_init": chosen}
    if lgm is not None:
        for init in args.lgm_init:
            selection[f"lgm-{init}"] = score_on_validation(
                launch, root, root / f"ipc{ipc}-lgm-{init}", [*config, *common, *lgm["schedule"], *seeded,
                                                               "--distill.init", init],
                args.selection_trials, method="lgm", snapshots=args.snapshot_points)
    for run, argv in later:
        distill_only(launch, root, run, argv)
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
    others = [network_folder(args, other) for other in args.networks if other != backbone]
    lgm_runs = lgm["runs"] if lgm is not None else {}
    train_sets = [name for name in FINAL_TRAIN_SETS if name != "lgm" or lgm_runs] + args.ablations
    final_iterations = final_iterations_of(args, backbone)
    entry["final"] = {}
    for seed in args.seeds:
        run = root / f"ipc{ipc}-seed{seed}"
        copy_statistics(root, run)
        stages = "distill,evaluate"
        if seed == first:  # the selection run made this seed's images already
            stages = "evaluate"
            if not (run / "synthetic").exists():
                shutil.copytree(root / f"ipc{ipc}-{chosen}" / "synthetic", run / "synthetic")
        if not (run / "results.json").is_file():
            launch([*config, *common, *schedule, "--distill.init", chosen, "--output_dir", str(run),
                    "--stages", stages, "--eval_split", "test", "--seed", str(seed),
                    "--evaluate.seed_base", str(SEED_BASE + SEED_STRIDE * seed), "--evaluate.trials", str(args.trials),
                    "--evaluate.iterations", str(final_iterations),
                    "--evaluate.max_iterations", str(final_iterations),
                    "--evaluate.train_sets", ",".join(train_sets), "--evaluate.modes", MODES,
                    "--evaluate.baseline_modes", MODES, "--eval_backbones", ",".join([folder, *others]),
                    "--evaluate.full_dataset", "false",
                    *extra_synthetic(ipc, root, seed, lgm_runs, args.ablations)])
        entry["final"][str(seed)] = str(run)


def lgm_plan(args, backbone: str, ipc: int, root: Path, base: list[str]) -> dict | None:
    """LGM's schedule and the folders of the final tables' LGM per seed (None where LGM does not run): on the
    first seed the run from the paper's noise start where it ran (scored on validation as a start), on every
    other seed that start distilled again."""
    if ipc not in args.lgm_ipcs or not args.lgm_steps:
        return None
    every = args.lgm_pyramid_every or schedule_of(args.steps[ipc], backbone)[1]
    schedule = ["--ipc", str(ipc), "--distill.method", "lgm", "--distill.aug_rounds", "10",
                "--distill.iterations", str(args.lgm_steps), "--distill.pyramid_every", str(every)]
    init = "noise" if "noise" in args.lgm_init else args.lgm_init[0]
    runs = {args.seeds[0]: root / f"ipc{ipc}-lgm-{init}"}
    argv = {}
    for seed in args.seeds[1:]:
        runs[seed] = root / f"ipc{ipc}-lgm-{init}-seed{seed}"
        argv[seed] = [*base, *schedule, "--seed", str(seed), "--distill.init", init]
    return {"schedule": schedule, "runs": runs, "argv": argv}


def ablation_run(root: Path, ipc: int, method: str, seed: int) -> Path:
    return root / f"ipc{ipc}-{method}-seed{seed}"


def later_distillations(args, root: Path, ipc: int, sfm: list[str], lgm: dict | None) -> list:
    """The cell's distillations that no choice on validation waits for, as (run folder, argv) in the order the
    bench runs them: LGM's later seeds, the ablations (``--ablations``, every seed), SFM's later seeds (with
    ``--final-init`` set; the final run of such a seed then finds its images made). ``sfm``: recipe, data and
    SFM's schedule, as the final runs pass them."""
    start = ["--distill.init", "noise" if args.final_init == "best" else args.final_init]
    later = [(lgm["runs"][seed], argv) for seed, argv in lgm["argv"].items()] if lgm is not None else []
    later += [(ablation_run(root, ipc, method, seed), [*sfm, *start, "--distill.method", method, "--seed", str(seed)])
              for seed in args.seeds for method in args.ablations]
    if args.final_init != "best":
        later += [(root / f"ipc{ipc}-seed{seed}", [*sfm, *start, "--seed", str(seed)]) for seed in args.seeds[1:]]
    return later


def extra_synthetic(ipc: int, root: Path, seed: int, lgm_runs: dict, ablations: list[str]) -> list[str]:
    """``--evaluate.extra_synthetic`` of a seed's final run: its LGM and ablation images."""
    folders = ([str(lgm_runs[seed])] if lgm_runs else []) + [str(ablation_run(root, ipc, method, seed))
                                                             for method in ablations]
    return ["--evaluate.extra_synthetic", ",".join(folders)] if folders else []


# ----------------------------------------------------------------------------------------------------------------
# Tables


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


def seed_rows(records_by_seed: dict[int, list[dict]], network_of) -> dict:
    """``{(eval network, row label): {distillation seed: {probe seed: accuracy}}}`` from each seed's records.

    Rows are matched by evaluation network and ``sfm_hf.report.row_label`` (train set, mode and whatever label a
    record carries), so fields the records gain later do not split or merge rows. ``network_of``: an evaluation
    backbone's name -> its network key.
    """
    from sfm_hf.report import row_label

    rows: dict = {}
    for seed, records in records_by_seed.items():
        for record in records:
            trials = record["per_trial"]
            probes = record.get("seeds", range(len(trials)))
            key = (network_of(record["eval_backbone"]), row_label(record))
            rows.setdefault(key, {})[seed] = dict(zip(probes, trials))
    return rows


def row_order(label: str) -> tuple:
    """The paper's row order: real baselines, distilled sets, references; each set's vanilla row before its CI row."""
    order = ("Random", "Centroids", "Neighbors (SFM)", "Neighbors (LGM)", "Neighbors (TCDD)", "Neighbors (NCDD)",
             "LGM", "TCDD", "NCDD", "SFM")
    base, _, suffix = label.partition("+")
    return (order.index(base) if base in order else len(order) if label != GOLDEN else len(order) + 1, suffix, label)


def percent(value: float | None, sign: bool = False) -> str:
    return "–" if value is None else f"{100 * value:{'+' if sign else ''}.1f}"


def cell_tables(backbone: str, ipc: int, rows: dict, goldens: dict, networks: list[str]) -> str:
    """One cell's tables: per evaluation network every row before -> after, the paired differences, the leads."""
    before = README_BEFORE.get((backbone, ipc), {})
    text = ""
    for network in networks:
        labels = sorted({label for (where, label) in rows if where == network}, key=row_order)
        if not labels:
            continue
        values = {label: rows[(network, label)] for label in labels}
        if network != backbone and network in goldens:  # the evaluation network's own golden classifier
            values[GOLDEN] = goldens[network]
            labels = sorted(set(labels) | {GOLDEN}, key=row_order)
        seeds = sorted({seed for per_seed in values.values() for seed in per_seed})
        trials = max(len(trials) for per_seed in values.values() for trials in per_seed.values())
        where = "the distillation network" if network == backbone else "cross-network, Table 4"
        then = (f"before: the README's table at {README_BEFORE_COMMIT} (one seed, 5 trials, CI anchored on real class "
                "means through the evaluation network)" if network in before
                else f"not in the README's table at {README_BEFORE_COMMIT}")
        text += (f"#### {backbone}, ipc {ipc} → evaluated on {network} ({where})\n\n"
                 f"Test accuracy %, mean ± std over {len(seeds)} distillation seed(s) x {trials} probe trial(s); "
                 f"{then}.\n\n")
        table = []
        for label in labels:
            summary = pooled({seed: list(per_trial.values()) for seed, per_trial in values[label].items()})
            table.append({"row": label, "before": before.get(network, {}).get(label, "–"),
                          "after": f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}",
                          "seeds": " / ".join(percent(mean) for _, mean in sorted(summary["seed_means"].items()))})
        text += markdown_table(table, [("row", "train set"), ("before", f"before ({README_BEFORE_COMMIT})"),
                                       ("after", "after"), ("seeds", "per-seed means")]) + "\n\n"
        if network == backbone:
            text += ("On the distillation network the CI projector's optimum is the identity whatever images it is "
                     "fitted on (docs/evaluation.md, 'Same network'): its CI rows approach the golden classifier and cannot "
                     "tell image sets apart; the other networks' tables are where CI measures the images.\n\n")
        text += paired_table(values) + "\n\n"
    return text


def paired_table(values: dict) -> str:
    """The paired differences of ``COMPARISONS`` with their intervals, and a line saying which leads are real."""
    table, verdicts = [], {"lead": [], "behind": [], "spread": []}
    optional = [pair for pair in OPTIONAL_COMPARISONS if pair[0] in values and pair[1] in values]
    for first, second in (*COMPARISONS, *optional):
        name = f"{first} − {second}"
        difference = (paired_difference(values[first], values[second])
                      if first in values and second in values else None)
        if difference is None:
            table.append({"name": name, "mean": "not run"})
            continue
        interval = ("– (one seed)" if difference["low"] is None
                    else f"[{percent(difference['low'], True)}, {percent(difference['high'], True)}]")
        verdict = "spread" if not excludes_zero(difference) else "lead" if difference["mean"] > 0 else "behind"
        table.append({"name": name, "mean": percent(difference["mean"], True), "interval": interval,
                      "seeds": " / ".join(percent(value, True) for value in difference["per_seed"].values()),
                      "pairs": f"{difference['seeds']} x {difference['pairs'] // difference['seeds']}",
                      "verdict": {"lead": f"{first} leads", "behind": f"{first} trails",
                                  "spread": "within the spread"}[verdict]})
        verdicts[verdict].append(f"{name} {percent(difference['mean'], True)} pt")
    text = markdown_table(table, [("name", "paired difference"), ("mean", "mean (pt)"),
                                  ("interval", "95 % interval (pt)"), ("seeds", "per-seed differences"),
                                  ("pairs", "seeds x trials"), ("verdict", "verdict")])
    listed = lambda names: ", ".join(names) if names else "none"  # noqa: E731
    return (text + "\n\nIntervals: Student's t over the per-seed means of the differences paired on seed and probe "
            "trial (seeds − 1 degrees of freedom). **Real leads** (interval above 0): " + listed(verdicts["lead"])
            + "; real deficits (interval below 0): " + listed(verdicts["behind"])
            + "; within the seeds' spread (interval holds 0): " + listed(verdicts["spread"]) + ".")


def final_tables(args, summary: dict) -> str:
    """The test-split tables of every cell, from each seed's results.json."""
    folders = {network: network_folder(args, network) for network in args.networks}
    by_name = {Path(folder).name: network for network, folder in folders.items()}
    network_of = lambda name: by_name.get(Path(name).name, Path(name).name)  # noqa: E731
    per_cell = {}
    for backbone, per_ipc in summary.items():
        for ipc, entry in per_ipc.items():
            if entry.get("final"):
                per_cell[(backbone, int(ipc[3:]))] = {int(seed): read_json(Path(run) / "results.json")
                                                     for seed, run in entry["final"].items()}
    goldens = {}
    for (backbone, _), records_by_seed in per_cell.items():
        for seed, records in records_by_seed.items():
            for record in records:
                if record["mode"] == "golden":
                    goldens.setdefault(backbone, {})[seed] = dict(zip(record.get("seeds", [0]), record["per_trial"]))
    text = ""
    for (backbone, ipc), records_by_seed in sorted(per_cell.items(),
                                                   key=lambda item: (item[0][1], args.backbones.index(item[0][0]))):
        ordered = [backbone] + [network for network in args.networks if network != backbone]
        text += cell_tables(backbone, ipc, seed_rows(records_by_seed, network_of), goldens, ordered)
    return text


# ----------------------------------------------------------------------------------------------------------------
# Cost: what each piece of a cell costs, read from a finished bench's folders, and the matrix's estimate from it


def quiet_scale(run: Path) -> float:
    """CPU seconds per wall second of a launch: a wall time measured inside it (a distillation's seconds, a
    training's) times this is about what it takes on a quiet core, when the launch ran one thread."""
    cost = read_json(run / "launch.json")
    return cost["cpu_seconds"] / cost["seconds"]


def distill_cpu(run: Path) -> float:
    metadata = read_json(run / "synthetic" / "synthetic.json")
    return metadata["seconds"] * quiet_scale(run)


def scorings(steps: int, points: int) -> int:
    """How many times a scored run trains its probes: on each snapshot (step 0 to the last) and the final images."""
    return (steps // snapshot_every(steps, points) + 2) if points else 1


def unit_costs(args, summary: dict) -> dict:
    """One-thread CPU seconds of the pieces of each cell, measured by this bench's own runs (``--launcher
    inprocess --threads 1``: CPU seconds of the process; see ``Launcher``), for ``estimate_seconds``."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    units = {"max_samples": args.max_samples,
             "view_bank": {str(ipc): views for ipc, views in args.view_bank.items()}, "stage1": {}, "launch": {},
             "cells": {}}
    per_step = lambda run: distill_cpu(run) / read_json(run / "synthetic" / "synthetic.json")["iterations"]  # noqa: E731
    for backbone, per_ipc in summary.items():
        root = args.runs / backbone
        units["stage1"][backbone] = read_json(root / "launch.json")["cpu_seconds"]
        # A launch's fixed part (start, loading the model and statistics) shows in the LGM runs that only distil.
        distilled = sorted(root.glob("ipc*-lgm-*-seed*"))
        units["launch"][backbone] = launch = mean([read_json(run / "launch.json")["cpu_seconds"] - distill_cpu(run)
                                                   for run in distilled]) if distilled else 0.0
        for ipc, entry in per_ipc.items():
            cell = {}
            sfm = [root / f"{ipc}-{name}" for name in entry["selection"] if not name.startswith("lgm-")]
            cell["sfm_step"] = mean([per_step(run) for run in sfm])
            lgm = sorted(root.glob(f"{ipc}-lgm-*-seed*"))
            if lgm:
                cell["lgm_step"] = mean([per_step(run) for run in lgm])
            entry_steps = entry["selection"][next(name for name in entry["selection"] if not name.startswith("lgm-"))]
            trainings = scorings(entry_steps["steps"], args.snapshot_points) * args.selection_trials
            cell["score_trial"] = mean([
                read_json(run / "launch.json")["cpu_seconds"] - distill_cpu(run) - launch for run in sfm]) / trainings
            banks, trains, fixed = [], [], []
            for seed, run in entry.get("final", {}).items():
                run, records = Path(run), read_json(Path(run) / "results.json")
                scale, trials = quiet_scale(run), max(record["trials"] for record in records)
                banks.append(sum(record.get("view_bank_seconds") or 0.0 for record in records) * scale / trials)
                trains.append(sum(record["seconds"] for record in records if record["mode"] != "golden") * scale / trials)
                # A later seed's final run distils its SFM images unless --final-init made them beforehand.
                made_here = int(seed) != args.seeds[0] and args.final_init == "best"
                fixed.append(read_json(run / "launch.json")["cpu_seconds"] - trials * (banks[-1] + trains[-1])
                             - (distill_cpu(run) if made_here else 0.0))
            if fixed:
                cell.update(final_bank=mean(banks), final_train=mean(trains), final_fixed=mean(fixed),
                            final_iterations=final_iterations_of(args, backbone))
            units["cells"][f"{backbone}/{ipc[3:]}"] = cell
    return units


def accelerate_start_cpu() -> float:
    """CPU seconds ``accelerate launch`` adds to a run that ``--launcher inprocess`` does not pay: the launcher's
    interpreter and the run's own interpreter with its imports (measured by doing just that)."""
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    for code in ("import accelerate.commands.launch",
                 "import torch, transformers, datasets, timm, sfm_hf.runner, sfm_hf.evaluation, sfm_hf.distill"):
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return cpu_seconds(resource.RUSAGE_CHILDREN) - before


def estimate_seconds(args, units: dict) -> tuple[float, list[str]]:
    """One quiet core's seconds for ``args``' matrix from ``units`` (``unit_costs``), and the cells it could not
    price. Fixed parts of a launch that read real images (Stage I, the final runs' feature passes) scale with
    ``--max-samples``; view banks with the views, probe trainings with ``--final-iterations``."""
    samples = args.max_samples / units["max_samples"]
    start = units.get("accelerate_start", 0.0) if args.launcher == "accelerate" else 0.0
    total, missing = 0.0, []
    for backbone in args.backbones:
        if backbone not in units["stage1"]:
            missing.append(backbone)
            continue
        launch = units["launch"][backbone]
        total += start + launch + (units["stage1"][backbone] - launch) * samples
    for ipc in args.ipcs:
        for backbone in args.backbones:
            cell = units["cells"].get(f"{backbone}/{ipc}")
            if cell is None or "final_fixed" not in cell:
                missing.append(f"{backbone} ipc {ipc}")
                continue
            launch = start + units["launch"][backbone]
            steps, _ = schedule_of(args.steps[ipc], backbone)
            inits = [init for init in args.inits if not (ipc == 1 and SAME_AT_IPC1.get(init) in args.inits)]
            scored = scorings(steps, args.snapshot_points) * args.selection_trials * cell["score_trial"]
            total += len(inits) * (launch + steps * cell["sfm_step"] + scored)
            if ipc in args.lgm_ipcs and args.lgm_steps:
                if "lgm_step" not in cell:
                    missing.append(f"LGM of {backbone} ipc {ipc}")
                else:
                    lgm = launch + args.lgm_steps * cell["lgm_step"]
                    lgm_scored = scorings(args.lgm_steps, args.snapshot_points) * args.selection_trials
                    total += len(args.lgm_init) * (lgm + lgm_scored * cell["score_trial"])
                    total += (len(args.seeds) - 1) * lgm
            if args.snapshot_points:
                total += launch + 2 * args.selection_trials * cell["score_trial"]
            views = args.view_bank[ipc] / units["view_bank"][str(ipc)]
            iterations = final_iterations_of(args, backbone) / cell["final_iterations"]
            trial = cell["final_bank"] * views + cell["final_train"] * iterations
            fixed = launch + (cell["final_fixed"] - units["launch"][backbone]) * samples
            total += len(args.seeds) * (fixed + args.trials * trial) + (len(args.seeds) - 1) * steps * cell["sfm_step"]
            # An ablation's step costs what SFM's does (the same forward and backward, another loss on the centres).
            total += len(args.seeds) * len(args.ablations) * (launch + steps * cell["sfm_step"])
    return total, missing


def write_summary(args, summary: dict) -> str:
    text = (f"# MNIST, {', '.join(args.backbones)} (evaluated on {', '.join(args.networks)})\n\n"
            f"Command: `{args.command}`\n\n## Start of the synthetic images (validation split, seed "
            f"{args.seeds[0]})\n\n" + selection_table(summary) + "\n\n")
    timed = time_to_quality_table(summary)
    if timed:
        text += ("## Time to quality (validation split, vanilla probe; seconds of distillation)\n\n" + timed)
    finals = final_tables(args, summary)
    if finals:
        text += "## Test split, every set x {vanilla, CI}, over distillation seeds\n\n" + finals
    (args.runs / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.runs / "summary.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "outputs" / "real-assets",
                        help="Where the wheels, MNIST and the model folders go (the recipes name their folders; the "
                        "bench looks them up here by name).")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "real", help="Run folders and the summary.")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="accelerate")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help="Distillation networks by key (recipes/real_mnist_<key>.yaml each); every other one "
                        "listed is also an evaluation network of each (Table 4).")
    parser.add_argument("--others", default="",
                        help="Evaluation-only networks by key (prepared and evaluated on, not distilled with).")
    parser.add_argument("--ipcs", default="1,10", help="Images per class to run, e.g. 1,10.")
    parser.add_argument("--seeds", default="0,1,2",
                        help="Distillation seeds (run seed): the start is chosen on the first; every seed distils "
                        "SFM and LGM and is evaluated on test. Three is the fewest whose interval says anything; "
                        "four (0,1,2,3) make the t interval over the per-seed differences a third narrower "
                        "(t 3.18 / sqrt 4 against 4.30 / sqrt 3 standard deviations) for 4/3 of the final runs.")
    parser.add_argument("--inits", default=",".join(INITS), help="SFM starts (distill.init) to run and choose from.")
    parser.add_argument("--final-init", default="best",
                        help="The SFM start of the final tables: 'best' (the highest validation score among --inits) "
                        "or a start that --inits holds, fixed in advance (the paper's: noise); the other starts are "
                        "still scored on validation and drawn in the time-to-quality plots.")
    parser.add_argument("--ablations", default="",
                        help="The paper's Table 3 ablations to add to the final tables, comma-separated "
                        f"({', '.join(ABLATIONS)}): SFM's schedule and start (--final-init; noise with 'best'), "
                        "distilled with every seed.")
    parser.add_argument("--max-samples", type=int, default=5000, help="data.max_samples_per_split.")
    parser.add_argument("--steps-ipc1", default="recipe",
                        help="distill.iterations,pyramid_every at ipc 1, or 'recipe': each network's recipe's (the CNN "
                        "recipes: 300,40).")
    parser.add_argument("--steps-ipc10", default="100,15",
                        help="distill.iterations,pyramid_every at ipc 10 (or 'recipe').")
    parser.add_argument("--lgm-steps", type=int, default=300,
                        help="LGM steps (0: no LGM); 300 runs it well past SFM's wall time at ipc 1 here.")
    parser.add_argument("--lgm-init", default="noise",
                        help="LGM's starts (distill.init, comma-separated; the paper's is noise), scored on the first "
                        "seed; the final tables show LGM from noise where it ran, distilled with every seed.")
    parser.add_argument("--lgm-ipcs", default="1", help="The ipcs LGM runs at (its 10 rounds cost 10x a step).")
    parser.add_argument("--lgm-pyramid-every", type=int, default=0,
                        help="LGM's distill.pyramid_every (0: the cell's): with fewer LGM than SFM steps, a shorter "
                        "interval lets LGM's pyramid grow as far as SFM's.")
    parser.add_argument("--snapshot-points", type=int, default=10,
                        help="Snapshots along each first-seed distillation run, scored on validation for the "
                        "time-to-quality table and plots (0: none, no time-to-quality).")
    parser.add_argument("--selection-trials", type=int, default=2, help="Trials of each start's validation score.")
    parser.add_argument("--trials", type=int, default=2, help="Probe trials per seed of the final test evaluation.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process launcher (default 1; the accelerate launcher's runs "
                        "use torch's own default).")
    parser.add_argument("--final-iterations", default="recipe",
                        help="evaluate.iterations (= max_iterations: a fixed schedule) of the final test evaluation, "
                        "or 'recipe': each network's recipe's (the start selection always uses the recipe's).")
    parser.add_argument("--view-bank-ipc1", type=int, default=64,
                        help="evaluate.view_bank of the ipc 1 runs: augmented views per train image, forwarded once "
                        "per trial and shared by its trainings (0: fresh views every step, the paper's protocol; "
                        "docs/performance.md compares them).")
    parser.add_argument("--view-bank-ipc10", type=int, default=32,
                        help="evaluate.view_bank of the ipc 10 runs, whose banks hold ten times the images.")
    parser.add_argument("--selection-only", action="store_true",
                        help="Stop after choosing the start on validation (and LGM): no test evaluation.")
    parser.add_argument("--later-seeds-only", action="store_true",
                        help="Only the distillations no validation choice waits for (LGM's later seeds, the "
                        "ablations, SFM's later seeds with --final-init), from the end of the list: started beside "
                        "a full bench with the same options and --runs once that one's Stage I is done, it gives the "
                        "bench a second core (each waits for a run the other holds, then finds it made).")
    parser.add_argument("--costs", type=Path, default=MEASURED_COSTS,
                        help="Unit costs the estimate printed at the start is made of: a costs.json that a bench run "
                        "writes into its --runs folder (measured with --launcher inprocess --threads 1).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Further override for every run, e.g. --set evaluate.iterations=100 (repeatable).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python benchmarks/real_bench.py", *(sys.argv[1:] if argv is None else argv)])
    args.overrides = [f"--{pair}" for pair in args.set]
    args.steps = {1: args.steps_ipc1, 10: args.steps_ipc10}
    args.view_bank = {1: args.view_bank_ipc1, 10: args.view_bank_ipc10}
    args.ipcs = [int(ipc) for ipc in args.ipcs.split(",")]
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    args.inits = args.inits.split(",")
    args.ablations = [method for method in args.ablations.split(",") if method]
    unknown = [method for method in args.ablations if method not in ABLATIONS]
    if unknown:
        raise SystemExit(f"error: --ablations: {unknown[0]!r} is not one of {', '.join(ABLATIONS)}.")
    if args.final_init != "best" and args.final_init not in args.inits:
        raise SystemExit(f"error: --final-init {args.final_init!r}: give 'best' or one of --inits "
                         f"({','.join(args.inits)}).")
    args.lgm_init = args.lgm_init.split(",")
    args.lgm_ipcs = [int(ipc) for ipc in args.lgm_ipcs.split(",") if ipc]
    args.backbones = args.backbones.split(",")
    args.networks = list(dict.fromkeys(args.backbones + [key for key in args.others.split(",") if key]))
    for ipc, option in args.steps.items():
        if option != "recipe" and not re.fullmatch(r"\d+,\d+", option):
            raise SystemExit(f"error: --steps-ipc{ipc} {option!r}: give STEPS,EVERY (e.g. 300,40) or 'recipe'.")
    if args.final_iterations != "recipe" and not args.final_iterations.isdigit():
        raise SystemExit(f"error: --final-iterations {args.final_iterations!r}: give a number of steps or 'recipe'.")
    unknown = [ipc for ipc in args.ipcs if ipc not in args.steps]
    if unknown:
        raise SystemExit(f"error: --ipcs: no schedule for ipc {unknown[0]}; the bench runs ipc 1 and 10.")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds {','.join(map(str, args.seeds))} repeats a seed.")
    if not 0 < args.trials < SEED_STRIDE:
        raise SystemExit(f"error: --trials must lie in 1..{SEED_STRIDE - 1}, got {args.trials}.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    start = time.perf_counter()
    estimate = None
    if args.costs.is_file():
        costs = read_json(args.costs)
        estimate, unpriced = estimate_seconds(args, costs["units"])
        if unpriced:  # a part of the matrix only: not an estimate of this run
            estimate = None
        print("bench-real: " + (
            f"no estimate: {args.costs} does not price {', '.join(unpriced)}" if unpriced else
            f"estimated {estimate / 3600:.2f} h of one quiet CPU core (unit costs from {args.costs}: "
            f"{costs['measured']})"
        ), flush=True)
    else:
        print(f"bench-real: no estimate ({args.costs} does not exist)", flush=True)
    prepare_assets(args)
    launch = Launcher(args.launcher, args.threads)
    summary: dict = {}
    for ipc in args.ipcs:
        for backbone in args.backbones:
            if args.later_seeds_only and not (args.runs / backbone / "statistics" / "statistics.safetensors").is_file():
                raise SystemExit(f"error: --later-seeds-only: no Stage I in {args.runs / backbone} yet; start it "
                                 "beside a full bench once that one has written its statistics.")
            run_backbone(args, launch, backbone, ipc, summary)
            if not args.later_seeds_only:
                write_summary(args, summary)
    if args.later_seeds_only:
        print(f"bench-real: the later seeds' distillations are made ({time.perf_counter() - start:.0f} s wall)")
        return 0
    print(write_summary(args, summary))
    units = {**unit_costs(args, summary), "accelerate_start": accelerate_start_cpu()}
    measured = (f"`{args.command}`, launcher {args.launcher}, {args.threads or 'default'} thread(s), "
                f"{time.strftime('%Y-%m-%d')}")
    (args.runs / "costs.json").write_text(json.dumps({"measured": measured, "units": units}, indent=2))
    default, unpriced = estimate_seconds(parse_args([]), units)
    print(f"bench-real: {time.perf_counter() - start:.0f} s wall (estimated "
          f"{'–' if estimate is None else f'{estimate:.0f}'} s of one quiet core); "
          f"this run's unit costs ({args.runs / 'costs.json'}; one thread measures them) "
          + (f"do not price the default matrix (no {', '.join(unpriced)})" if unpriced else
             f"price the default matrix at {default / 3600:.2f} h of one quiet core"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
