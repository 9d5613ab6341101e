"""benchmarks/real_bench.py: the runs it launches per seed, its statistics and the tables it assembles."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
# real_bench puts benchmarks/ on sys.path itself, for its own imports (real_data, harness).
spec = importlib.util.spec_from_file_location("real_bench", BENCHMARKS / "real_bench.py")
real_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_bench)
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402

MBV2 = "outputs/real-assets/mobilenet_v2-32px"
T_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def test_the_paired_interval_is_a_t_over_the_per_seed_means_of_the_trial_paired_differences():
    sfm = {0: {3407: 0.60, 3408: 0.62}, 1: {4407: 0.58, 4408: 0.60, 4409: 0.99}, 2: {5407: 0.63, 5408: 0.61}}
    # Trials pair on their probe seed, whatever the order; seed 1's third trial has no partner and is left out.
    centroids = {0: {3408: 0.55, 3407: 0.57}, 1: {4407: 0.57, 4408: 0.57}, 2: {5407: 0.56, 5408: 0.58}}
    difference = harness.paired_difference(sfm, centroids)
    assert difference["per_seed"] == pytest.approx({0: 0.05, 1: 0.02, 2: 0.05})
    assert difference["mean"] == pytest.approx(0.04)
    # Per-seed differences 0.05, 0.02, 0.05: sample std sqrt(3e-4), standard error 0.01, 2 degrees of freedom.
    assert (difference["low"], difference["high"]) == pytest.approx((0.04 - T_975_2 * 0.01, 0.04 + T_975_2 * 0.01))
    assert (difference["seeds"], difference["pairs"]) == (3, 6)
    # All six paired differences are positive, yet three seeds do not make it a real lead.
    assert not harness.excludes_zero(difference)
    assert harness.excludes_zero(harness.paired_difference(
        {seed: {1: 0.6 + 0.01 * seed} for seed in range(3)}, {seed: {1: 0.5 + 0.012 * seed} for seed in range(3)}))


def test_one_seed_gives_a_difference_without_an_interval_and_no_shared_trial_gives_none():
    one = harness.paired_difference({0: {1: 0.6, 2: 0.7}}, {0: {1: 0.5, 2: 0.5}})
    assert one["mean"] == pytest.approx(0.15) and one["low"] is None and one["high"] is None
    assert not harness.excludes_zero(one)
    assert harness.paired_difference({0: {1: 0.6}}, {0: {2: 0.5}}) is None
    assert harness.paired_difference({0: {1: 0.6}}, {1: {1: 0.5}}) is None


def test_pooled_is_the_mean_and_population_std_over_every_seed_and_trial():
    pooled = harness.pooled({0: [0.5, 0.7], 1: [0.6, 0.6]})
    assert pooled["mean"] == pytest.approx(0.6) and pooled["std"] == pytest.approx(math.sqrt(0.005))
    assert pooled["seed_means"] == pytest.approx({0: 0.6, 1: 0.6}) and pooled["values"] == 4


# ---------------------------------------------------------------------------------------------------------------
# The runs of a cell


def value(argv: list[str], key: str, default=None):
    return real_bench.last_value(argv, key) if key in argv else default


def fake_accuracy(train_set: str, mode: str, network: str, seed: int, trial: int) -> float:
    """Test accuracy of a fake final run: SFM 5 pt above Centroids in every mode, seed and trial; LGM drifts."""
    base = {"random": 0.40, "centroids": 0.55, "sfm": 0.60, "lgm": 0.10 + 0.01 * seed}.get(train_set, 0.45)
    return base + (0.1 if mode == "ci" else 0.0) + (0.02 if "efficientnet" in network else 0.0) + 0.002 * trial


# What the fake runs cost, in CPU seconds (their wall seconds too: a quiet machine): a launch's fixed part, Stage I,
# a distillation step, one probe training of a validation score, a final run's feature passes, and per trial and
# record of a final run its trainings and its view bank.
LAUNCH, STAGE1, STEP, SCORE, FEATURES, TRAIN, BANK = 2.0, 5.0, {"sfm": 0.01, "lgm": 0.1}, 0.5, 3.0, 0.1, 0.2
STEP.update(tcdd=STEP["sfm"], ncdd=STEP["sfm"])
SYNTHETIC_SETS = ("sfm", "lgm", "tcdd", "ncdd")


class FakeLauncher:
    """Leaves what each launch of recipes/distill.py would (statistics, synthetic.json, results.json, a curve,
    launch.json, at the costs above) and records every argv and cost."""

    def __init__(self):
        self.argvs, self.cpu = [], []

    def __call__(self, argv):
        self.argvs.append(argv)
        run, stages = Path(value(argv, "--output_dir")), value(argv, "--stages").split(",")
        run.mkdir(parents=True, exist_ok=True)
        seed, method = int(value(argv, "--seed", 0)), value(argv, "--distill.method", "sfm")
        cpu = LAUNCH
        if "statistics" in stages:
            (run / "statistics").mkdir()
            (run / "statistics" / "statistics.safetensors").write_text("")
            cpu += STAGE1
        # Stage II skips a folder that holds its images already (made beside this run, or by an earlier one).
        if "distill" in stages and not (run / "synthetic" / "synthetic.json").is_file():
            iterations = int(value(argv, "--distill.iterations"))
            (run / "synthetic").mkdir()
            (run / "synthetic" / "synthetic.json").write_text(json.dumps({
                "method": method, "ipc": int(value(argv, "--ipc")), "seconds": iterations * STEP[method],
                "seed": seed, "iterations": iterations,
                "distill": {"init": value(argv, "--distill.init"), "aug_rounds": 1},
                "flow_cosine": {"initial_images": 0.1, "final_images": 0.9}}))
            cpu += iterations * STEP[method]
        if "evaluate" in stages:
            records = self.records(argv, seed, method)
            (run / "results.json").write_text(json.dumps(records))
            trials, sets = int(value(argv, "--evaluate.trials")), len(value(argv, "--evaluate.train_sets").split(","))
            if value(argv, "--eval_split") == "validation":
                every = int(value(argv, "--distill.snapshot_every", 0))
                scorings = int(value(argv, "--distill.iterations")) // every + 2 if every else 1
                cpu += scorings * sets * trials * SCORE
            else:
                cpu += FEATURES + sum(record.get("seconds", 0.0) + record.get("view_bank_seconds", 0.0)
                                      for record in records)
        if value(argv, "--evaluate.time_to_quality") == "true":
            (run / "evaluation").mkdir()
            points = [{"step": 0, "seconds": 0.0, "mean": 0.3}, {"step": 10, "seconds": 5.0, "mean": 0.5}]
            (run / "evaluation" / "time_to_quality.json").write_text(json.dumps({"curves": [{
                "train_set": method, "init": value(argv, "--distill.init"), "eval_backbone": MBV2, "mode": "vanilla",
                "points": points}]}))
        cost = {"seconds": cpu, "cpu_seconds": cpu, "memory": None}
        (run / "launch.json").write_text(json.dumps(cost))
        self.cpu.append(cpu)
        return cost

    @staticmethod
    def records(argv, seed, method):
        backbone = value(argv, "--backbone")
        networks = [backbone] if value(argv, "--eval_backbones") == "[]" else value(argv, "--eval_backbones").split(",")
        trials, seed_base = int(value(argv, "--evaluate.trials")), int(value(argv, "--evaluate.seed_base", 3407))
        synthetic = [name for name in value(argv, "--evaluate.train_sets").split(",") if name in SYNTHETIC_SETS]
        modes = value(argv, "--evaluate.modes", "vanilla,ci").split(",")
        baseline_modes = value(argv, "--evaluate.baseline_modes", "vanilla").split(",")
        sets = []
        for name in value(argv, "--evaluate.train_sets").split(","):
            if name == "neighbors":
                sets += [(f"neighbors_{of}", baseline_modes) for of in synthetic]
            else:
                sets.append((name, modes if name in synthetic else baseline_modes))
        validation = value(argv, "--eval_split") == "validation"
        records = []
        for network in networks:
            for name, set_modes in sets:
                for mode in set_modes:
                    per_trial = [(0.6 if value(argv, "--distill.init") == "centroids" else 0.2) if validation
                                 else fake_accuracy(name, mode, network, seed, trial) for trial in range(trials)]
                    records.append({"train_set": name, "mode": mode, "distill_backbone": backbone,
                                    "eval_backbone": network, "mean": sum(per_trial) / trials, "std": 0.0,
                                    "per_trial": per_trial, "seeds": [seed_base + k for k in range(trials)],
                                    "trials": trials, "seconds": TRAIN * trials, "view_bank_seconds": BANK * trials,
                                    "a_field_added_later": {"anything": 1}})
        golden = 0.86 if "mobilenet" in backbone else 0.79
        records.append({"train_set": "full_dataset", "mode": "golden", "distill_backbone": backbone,
                        "eval_backbone": backbone, "mean": golden, "std": 0.0, "per_trial": [golden], "trials": 1})
        return records


@pytest.fixture
def bench(tmp_path):
    """Both CNN cells at ipc 1 over three seeds, run by the fake launcher; (args, launcher, summary)."""
    args = real_bench.parse_args(["--runs", str(tmp_path / "runs"), "--assets", str(tmp_path / "assets"),
                                  "--ipcs", "1", "--seeds", "0,1,2", "--inits", "noise,centroids", "--trials", "2",
                                  "--lgm-steps", "30", "--snapshot-points", "2", "--final-iterations", "40"])
    launch, summary = FakeLauncher(), {}
    for backbone in args.backbones:
        real_bench.run_backbone(args, launch, backbone, 1, summary)
    return args, launch, summary


def test_the_start_is_chosen_on_validation_of_the_first_seed_before_any_run_sees_test(bench):
    args, launch, summary = bench
    assert summary["mobilenet_v2"]["ipc1"]["chosen_init"] == "centroids"
    # --steps-ipc1 recipe (the default): each network's recipe's schedule.
    distill = yaml.safe_load(real_bench.recipe("mobilenet_v2").read_text())["distill"]
    assert (value(launch.argvs[1], "--distill.iterations"), value(launch.argvs[1], "--distill.pyramid_every")) == (
        str(distill["iterations"]), str(distill["pyramid_every"]))
    first_test = next(k for k, argv in enumerate(launch.argvs) if value(argv, "--eval_split") == "test")
    for argv in launch.argvs[:first_test]:
        assert value(argv, "--seed", "0") == "0" or value(argv, "--stages") == "distill"
        assert value(argv, "--eval_split") in (None, "validation")


def test_every_seed_distils_sfm_and_lgm_and_evaluates_every_set_in_both_modes_on_every_network(bench, tmp_path):
    args, launch, _ = bench
    runs = tmp_path / "runs" / "mobilenet_v2"
    lgm_distills = [argv for argv in launch.argvs if value(argv, "--stages") == "distill"
                    and str(runs) in value(argv, "--output_dir")]
    assert [(value(argv, "--seed"), value(argv, "--distill.method"), value(argv, "--distill.aug_rounds"))
            for argv in lgm_distills] == [("1", "lgm", "10"), ("2", "lgm", "10")]
    finals = {value(argv, "--seed"): argv for argv in launch.argvs
              if value(argv, "--eval_split") == "test" and str(runs) in value(argv, "--output_dir")}
    assert sorted(finals) == ["0", "1", "2"]
    for seed, argv in finals.items():
        assert value(argv, "--evaluate.seed_base") == str(3407 + 1000 * int(seed))
        assert value(argv, "--evaluate.train_sets") == "random,centroids,neighbors,sfm,lgm"
        assert value(argv, "--evaluate.modes") == value(argv, "--evaluate.baseline_modes") == "vanilla,ci"
        assert value(argv, "--eval_backbones").split(",") == [str(tmp_path / "assets" / "mobilenet_v2-32px"),
                                                              str(tmp_path / "assets" / "efficientnet_lite0-32px")]
        # No real data through an evaluation network: Stage III's defaults (real_eval_data off, protocol fixed)
        # are neither overridden here nor in the recipe.
        assert "--evaluate.real_eval_data" not in argv and "--evaluate.protocol" not in argv
        recipe_evaluate = real_bench.recipe_config("mobilenet_v2")["evaluate"]
        assert not recipe_evaluate.get("real_eval_data", False) and recipe_evaluate["protocol"] == "fixed"
        assert value(argv, "--evaluate.iterations") == value(argv, "--evaluate.max_iterations") == "40"
        lgm = runs / ("ipc1-lgm-noise" if seed == "0" else f"ipc1-lgm-noise-seed{seed}")
        assert value(argv, "--evaluate.extra_synthetic") == str(lgm)
    # The first seed's SFM images are the chosen start's selection run; the others distil that start anew.
    assert value(finals["0"], "--stages") == "evaluate"
    assert json.loads((runs / "ipc1-seed0" / "synthetic" / "synthetic.json").read_text())["distill"]["init"] == "centroids"
    assert [value(finals[seed], "--stages") for seed in "12"] == ["distill,evaluate"] * 2
    assert {value(finals[seed], "--distill.init") for seed in "12"} == {"centroids"}


def test_the_tables_give_every_row_before_and_after_and_the_paired_leads(bench):
    args, _, summary = bench
    text = real_bench.final_tables(args, summary)
    same = text.split("#### mobilenet_v2, ipc 1 → evaluated on mobilenet_v2")[1].split("####")[0]
    cross = text.split("#### mobilenet_v2, ipc 1 → evaluated on efficientnet_lite0")[1].split("####")[0]
    for label in ("Random", "Random+CI", "Centroids", "Centroids+CI", "Neighbors (SFM)", "Neighbors (SFM)+CI",
                  "Neighbors (LGM)", "Neighbors (LGM)+CI", "LGM", "LGM+CI", "SFM", "SFM+CI"):
        assert f"| {label} |" in same and f"| {label} |" in cross
    assert "| Random | 40.1 ± 4.7 | 40.1 ± 0.1 | 40.1 / 40.1 / 40.1 |" in same
    assert "| SFM+CI | 78.7 ± 0.3 | 70.1 ± 0.1 |" in same
    # The cross table's reference row is the evaluation network's own golden classifier, from its own runs.
    assert "| Golden classifier (full data) | 86.2 | 86.0 ± 0.0 |" in same
    assert "| Golden classifier (full data) | 79.8 | 79.0 ± 0.0 |" in cross
    assert "| SFM | 41.4 | 62.1 ± 0.1 |" in cross
    # SFM − Centroids is 5 pt in every pair; SFM − LGM 50, 49, 48 pt over the seeds.
    assert "| SFM − Centroids | +5.0 | [+5.0, +5.0] | +5.0 / +5.0 / +5.0 | 3 x 2 | SFM leads |" in same
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert (f"| SFM − LGM | +49.0 | [+{100 * (0.49 - half):.1f}, +{100 * (0.49 + half):.1f}] | +50.0 / +49.0 / +48.0 "
            "| 3 x 2 | SFM leads |") in same
    assert "| SFM+CI − Centroids+CI | +5.0 |" in cross and "| SFM+CI − LGM+CI | +49.0 |" in cross
    assert "**Real leads** (interval above 0): SFM − Centroids +5.0 pt, SFM − LGM +49.0 pt" in same
    assert "CI projector's optimum is the identity" in same and "CI projector's optimum is the identity" not in cross


def test_a_cell_without_lgm_says_so_in_its_differences(tmp_path):
    args = real_bench.parse_args(["--runs", str(tmp_path / "runs"), "--assets", str(tmp_path / "assets"),
                                  "--backbones", "mobilenet_v2", "--ipcs", "10", "--seeds", "0,1", "--inits", "noise",
                                  "--trials", "1", "--snapshot-points", "0"])
    summary = {}
    launch = FakeLauncher()
    real_bench.run_backbone(args, launch, "mobilenet_v2", 10, summary)
    assert not any(value(argv, "--distill.method") == "lgm" for argv in launch.argvs)
    # --final-iterations recipe (the default): the recipe's probe schedule, fixed.
    recipe = yaml.safe_load(real_bench.recipe("mobilenet_v2").read_text())
    final = launch.argvs[-1]
    assert value(final, "--evaluate.iterations") == value(final, "--evaluate.max_iterations") == str(
        recipe["evaluate"]["iterations"])
    text = real_bench.final_tables(args, summary)
    assert "| SFM − LGM | not run |" in text and "| SFM − Centroids | +5.0 | [+5.0, +5.0] |" in text
    assert "| LGM |" not in text


DINOV2_BENCH = ["--backbones", "dinov2_vits14", "--others", "mobilenet_v2", "--ipcs", "1", "--seeds", "0,1,2",
                "--inits", "noise,centroids", "--final-init", "noise", "--steps-ipc1", "40,10", "--lgm-steps", "8",
                "--lgm-pyramid-every", "2", "--ablations", "tcdd,ncdd", "--trials", "2", "--snapshot-points", "2",
                "--final-iterations", "40"]


def test_a_start_fixed_in_advance_and_the_ablations_run_with_every_seed(tmp_path):
    args = real_bench.parse_args(["--runs", str(tmp_path / "runs"), "--assets", str(tmp_path / "assets"),
                                  *DINOV2_BENCH])
    launch, summary = FakeLauncher(), {}
    real_bench.run_backbone(args, launch, "dinov2_vits14", 1, summary)
    runs = tmp_path / "runs" / "dinov2_vits14"
    # Centroids scores higher on validation (the fake's 0.6 against 0.2), yet the tables keep the paper's start.
    entry = summary["dinov2_vits14"]["ipc1"]
    assert entry["selection"]["centroids"]["validation_mean"] > entry["selection"]["noise"]["validation_mean"]
    assert entry["chosen_init"] == "noise"
    distilled = {Path(value(argv, "--output_dir")).name: argv for argv in launch.argvs
                 if value(argv, "--stages") == "distill"}
    assert sorted(distilled) == sorted([*(f"ipc1-{method}-seed{seed}" for method in ("tcdd", "ncdd") for seed in "012"),
                                        "ipc1-lgm-noise-seed1", "ipc1-lgm-noise-seed2", "ipc1-seed1", "ipc1-seed2"])
    for name, argv in distilled.items():
        method = value(argv, "--distill.method", "sfm")
        every = "2" if method == "lgm" else "10"
        assert (value(argv, "--distill.init"), value(argv, "--distill.pyramid_every")) == ("noise", every), name
        assert value(argv, "--distill.iterations") == ("8" if method == "lgm" else "40"), name
    finals = {value(argv, "--seed"): argv for argv in launch.argvs if value(argv, "--eval_split") == "test"}
    for seed, argv in finals.items():
        assert value(argv, "--evaluate.train_sets") == "random,centroids,neighbors,sfm,lgm,tcdd,ncdd"
        lgm = runs / ("ipc1-lgm-noise" if seed == "0" else f"ipc1-lgm-noise-seed{seed}")
        assert value(argv, "--evaluate.extra_synthetic").split(",") == [
            str(lgm), str(runs / f"ipc1-tcdd-seed{seed}"), str(runs / f"ipc1-ncdd-seed{seed}")]
    # SFM's later seeds were distilled before their final runs, from the fixed start and the cell's schedule.
    assert all(json.loads((runs / f"ipc1-seed{seed}" / "synthetic" / "synthetic.json").read_text())["distill"]["init"]
               == "noise" for seed in "012")
    text = real_bench.final_tables(args, summary)
    same = text.split("#### dinov2_vits14, ipc 1 → evaluated on dinov2_vits14")[1].split("####")[0]
    for label in ("TCDD", "TCDD+CI", "NCDD", "NCDD+CI", "Neighbors (TCDD)"):
        assert f"| {label} |" in same
    assert "| SFM − TCDD | +15.0 |" in same and "| SFM − Random | +20.0 |" in same


def test_a_later_seeds_only_bench_makes_the_other_end_of_the_list_and_the_full_bench_reuses_it(tmp_path):
    argv = ["--runs", str(tmp_path / "runs"), "--assets", str(tmp_path / "assets"), *DINOV2_BENCH]
    helper = FakeLauncher()
    stage1 = tmp_path / "runs" / "dinov2_vits14" / "statistics"
    stage1.mkdir(parents=True)
    (stage1 / "statistics.safetensors").write_text("")
    (stage1.parent / "launch.json").write_text(json.dumps({"seconds": STAGE1, "cpu_seconds": STAGE1}))
    real_bench.run_backbone(real_bench.parse_args([*argv, "--later-seeds-only"]), helper, "dinov2_vits14", 1, {})
    made = [Path(value(argv, "--output_dir")).name for argv in helper.argvs]
    # From the end of the full bench's list: SFM's later seeds first, LGM's last; nothing scored, nothing tested.
    assert made[:2] == ["ipc1-seed2", "ipc1-seed1"] and made[-2:] == ["ipc1-lgm-noise-seed2", "ipc1-lgm-noise-seed1"]
    assert {value(argv, "--stages") for argv in helper.argvs} == {"distill"}
    full = FakeLauncher()
    real_bench.run_backbone(real_bench.parse_args(argv), full, "dinov2_vits14", 1, {})
    steps_made_again = sum(cpu - LAUNCH for cpu, argv in zip(full.cpu, full.argvs)
                           if value(argv, "--stages") == "distill")
    assert steps_made_again == 0


def test_wait_for_other_run_blocks_until_the_holder_releases_the_output_dir(tmp_path):
    import threading
    import time

    from sfm_hf.utils import OutputDirLock

    lock = OutputDirLock(tmp_path)
    lock.acquire()
    threading.Timer(0.5, lock.release).start()
    start = time.perf_counter()
    real_bench.wait_for_other_run(tmp_path)
    assert time.perf_counter() - start >= 0.4
    real_bench.wait_for_other_run(tmp_path / "never-made")  # no lock file: nothing to wait for


def test_bench_options_that_cannot_run_fail_with_one_line(tmp_path):
    for argv, message in ((["--seeds", "0,0,1"], "repeats a seed"), (["--trials", "1000"], "--trials"),
                          (["--ipcs", "5"], "no schedule for ipc 5"), (["--steps-ipc10", "100"], "STEPS,EVERY"),
                          (["--ablations", "tcdd,lgm"], "'lgm' is not one of tcdd, ncdd"),
                          (["--final-init", "random", "--inits", "noise"], "--final-init 'random'")):
        with pytest.raises(SystemExit, match=message):
            real_bench.parse_args(argv)
    args = real_bench.parse_args(["--backbones", "mobilenet_v2,no_such_net"])
    with pytest.raises(SystemExit, match="no recipe recipes/real_mnist_no_such_net.yaml"):
        real_bench.prepare_assets(args)


def test_the_unit_costs_a_run_measures_price_that_very_matrix_at_what_its_launches_cost(bench):
    args, launch, summary = bench
    units = real_bench.unit_costs(args, summary)
    assert units["launch"] == {"mobilenet_v2": LAUNCH, "efficientnet_lite0": LAUNCH}
    cell = units["cells"]["mobilenet_v2/1"]
    assert cell["sfm_step"] == STEP["sfm"] and cell["lgm_step"] == pytest.approx(STEP["lgm"])
    assert cell["score_trial"] == pytest.approx(SCORE)
    estimate, unpriced = real_bench.estimate_seconds(args, units)
    assert estimate == pytest.approx(sum(launch.cpu)) and unpriced == []
    # Twice the trials, seeds and samples cost what the model says; a network without costs is named, not priced.
    bigger = real_bench.parse_args(["--ipcs", "1", "--seeds", "0,1,2,3", "--inits", "noise,centroids", "--trials",
                                    "4", "--lgm-steps", "30", "--snapshot-points", "2", "--final-iterations", "40",
                                    "--max-samples", "10000", "--backbones", "mobilenet_v2,dinov2_vits14"])
    cost, unpriced = real_bench.estimate_seconds(bigger, units)
    assert unpriced == ["dinov2_vits14", "dinov2_vits14 ipc 1"]
    assert cost > estimate / 2


# ---------------------------------------------------------------------------------------------------------------
# Time to quality


def curve(key: str, init: str, points: list[tuple[float, float]], method: str = "sfm") -> dict:
    """A run as score_on_validation reports it: its final score, cost and time-to-quality curve."""
    return {"method": method, "init": init, "validation_mean": points[-1][1], "time_to_quality": {
        "train_set": method, "init": init, "eval_backbone": MBV2, "mode": "vanilla", "final_row_mean": points[-1][1],
        "points": [{"step": 10 * k, "seconds": seconds, "mean": mean} for k, (seconds, mean) in enumerate(points)]}}


def test_the_time_to_quality_table_reads_each_runs_curve_against_centroids_and_the_best_final_accuracy():
    selection = {
        "centroids": curve("centroids", "centroids", [(0.0, 0.55), (10.0, 0.58), (20.0, 0.57)]),
        "noise": curve("noise", "noise", [(0.0, 0.10), (12.0, 0.30), (24.0, 0.55)]),
        "lgm-noise": curve("lgm-noise", "noise", [(0.0, 0.10), (50.0, 0.17), (200.0, 0.11)], method="lgm"),
    }
    flat = [{"train_set": "centroids", "mode": "vanilla", "eval_backbone": MBV2, "mean": 0.56, "std": 0.0},
            {"train_set": "random", "mode": "vanilla", "eval_backbone": MBV2, "mean": 0.30, "std": 0.0}]
    cell = real_bench.time_to_quality(selection, "centroids", flat)
    rows = {row["run"]: row for row in cell["rows"]}
    assert cell["centroids"] == 0.56 and cell["best_final"] == 0.57
    # 95 % of the best final accuracy (0.5415): centroids at once, noise at its last point, LGM never.
    assert rows["centroids"]["to_centroids_s"] == 10.0 and rows["centroids"]["to_95_s"] == 0.0
    assert rows["noise"]["to_centroids_s"] is None and rows["noise"]["to_95_s"] == 24.0
    assert rows["lgm-noise"]["to_centroids_s"] is None and rows["lgm-noise"]["to_95_s"] is None
    assert (rows["lgm-noise"]["best"], rows["lgm-noise"]["best_s"], rows["lgm-noise"]["final"]) == (0.17, 50.0, 0.11)
    assert cell["headline"] == ("SFM (from centroids) reaches 58.0 % in 10 s; LGM (from noise) reaches 17.0 % in "
                                "50 s (final 11.0 % at 200 s, 20 steps)")
    table = real_bench.time_to_quality_table({"mobilenet_v2": {"ipc1": {"time_to_quality": cell}}})
    assert "| SFM from centroids (chosen) | 20 | 10 | 0 | 58.0 (step 10, 10 s) | 57.0 (20 s) |" in table
    assert "| LGM from noise | 20 | – | – | 17.0 (step 10, 50 s) | 11.0 (200 s) |" in table


def test_a_scored_run_snapshots_its_steps_and_scores_them_on_validation(tmp_path):
    (tmp_path / "base" / "statistics").mkdir(parents=True)
    launch = FakeLauncher()
    argv = ["--config", "r.yaml", "--backbone", MBV2, "--ipc", "1", "--distill.iterations", "100",
            "--distill.init", "noise", "--distill.iterations", "300"]
    scored = real_bench.score_on_validation(launch, tmp_path / "base", tmp_path / "lgm", argv, 2, method="lgm",
                                            snapshots=10)
    called = launch.argvs[0]
    # The last --distill.iterations is the run's: 300 steps, a snapshot every 30.
    assert called[called.index("--distill.snapshot_every") + 1] == "30"
    assert called[called.index("--evaluate.time_to_quality") + 1] == "true"
    assert called[called.index("--eval_split") + 1] == "validation"
    assert called[called.index("--distill.method") + 1] == called[called.index("--evaluate.train_sets") + 1] == "lgm"
    assert scored["validation_mean"] == 0.2 and len(scored["time_to_quality"]["points"]) == 2
    assert scored["method"] == "lgm" and scored["s_per_step"] == STEP["lgm"]
    # Scored once: a second call reads the folder.
    real_bench.score_on_validation(launch, tmp_path / "base", tmp_path / "lgm", argv, 2, method="lgm", snapshots=10)
    assert len(launch.argvs) == 1
    plain = real_bench.score_on_validation(FakeLauncher(), tmp_path / "base", tmp_path / "sfm", argv, 2)
    assert plain["method"] == "sfm"


def test_snapshot_spacing():
    assert real_bench.snapshot_every(300, 10) == 30
    assert real_bench.snapshot_every(5, 10) == 1
    assert real_bench.snapshot_every(300, 0) == 0
