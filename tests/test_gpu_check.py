"""benchmarks/gpu_check.py on CPU: the plan and its input checks, the no-CUDA stop, and its bf16 run's Stage II.

The GPU-only paths the check exercises are covered on CPU as far as CPU allows: bf16 autocast through the check's
own arguments (below) and step by step (test_fast_path: bf16 follows the fp32 loss); ``distill.compile``
(test_fast_path: compiled steps give the eager images); pinned-memory loading (test_fast_path, CUDA only: this
torch build refuses to pin memory without a driver); per-process sharding (test_distributed: two real CPU ranks
against one process).
"""

import importlib.util
import json
import shutil
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sfm_hf.config import parse_config
from sfm_hf.runner import run_stages

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up while being defined
spec.loader.exec_module(gpu_check)

# The demo backbone's 28 px and a few digits: the check's shape at test size.
TINY = gpu_check.Cell(image_size=28, samples_per_split=50, sfm_steps=3, pyramid_every=2, lgm_steps=2, trials=1,
                      eval_iterations=5, view_bank=2)


@pytest.fixture
def inputs(tmp_path, digits_dir, tiny_backbone):
    """(assets, wheels) as --prepare lays them out: the digits as "mnist", a tiny DINOv2 as the backbone folder,
    and wheels that carry only their metadata."""
    backbone = tiny_backbone("dinov2")
    assets, wheels = tmp_path / "assets", tmp_path / "wheels"
    assets.mkdir()
    wheels.mkdir()
    (assets / "mnist").symlink_to(digits_dir)
    TINY.backbone_folder(assets).symlink_to(backbone)
    for name, version in gpu_check.WHEEL_PINS:
        write_wheel(wheels / f"{name}-{version}-py3-none-any.whl", name, version)
    return assets, wheels


def write_wheel(path: Path, name: str, version: str) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def arguments(tmp_path, assets, wheels, *extra):
    return ["--assets", str(assets), "--wheels", str(wheels), "--runs", str(tmp_path / "runs"), *extra]


def test_dry_run_prints_every_launch_and_finds_the_inputs_ready(tmp_path, inputs, capsys):
    assert gpu_check.main(["--dry-run", *arguments(tmp_path, *inputs)], cell=TINY) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in commands] == [
        "stage1", "lgm-fp32", "sfm-fp32", "lgm-bf16", "sfm-bf16", "sfm-bf16-compile"]
    assert all(" -m sfm_hf.launch " in line and " recipes/distill.py --config recipes/real_mnist_mobilenet_v2.yaml "
               in line for line in commands)
    assert all("--distill.mixed_precision bf16" in line for line in commands if "bf16" in line.split("]")[0])
    assert "--distill.compile true" in commands[-1]
    assert out.strip().endswith("inputs: ready")
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_each_missing_or_wrong_input(tmp_path, inputs, capsys):
    assets, wheels = inputs
    (wheels / "dill-0.4.1-py3-none-any.whl").unlink()
    wrong = wheels / "multiprocess-0.70.19-py3-none-any.whl"
    write_wheel(wrong, "multiprocess", "0.70.18")
    (assets / "mnist").unlink()
    larger = replace(TINY, image_size=32)
    larger.backbone_folder(assets).symlink_to(TINY.backbone_folder(assets).resolve())
    assert gpu_check.main(["--dry-run", *arguments(tmp_path, assets, wheels)], cell=larger) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 5
    assert "no train parquet" in problems[0] and "no test parquet" in problems[1]
    assert "takes 28 px, the cell 32" in problems[2]
    assert "no dill==0.4.1 wheel" in problems[3]
    assert "holds version 0.70.18, pinned 0.70.19" in problems[4]


def test_without_cuda_the_check_stops_in_one_line_before_any_work(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(arguments(tmp_path, *inputs), cell=TINY) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: no CUDA device") and captured.err.count("\n") == 1
    assert captured.out == "" and not (tmp_path / "runs").exists()


def test_the_bf16_run_autocasts_stage_two_and_its_records_give_the_figures(tmp_path, inputs, monkeypatch, caplog,
                                                                           accelerator):
    """The check's own arguments for Stage I and the bf16 SFM run, run in this process on CPU."""
    monkeypatch.chdir(gpu_check.REPO)
    autocasts = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, **options):
        autocasts.append((device_type, dtype))
        return real_autocast(device_type, dtype=dtype, **options)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    runs = {run.name: run for run in gpu_check.plan(TINY, inputs[0], tmp_path / "runs", compile_run=False)}
    stage1, sfm = runs["stage1"], runs["sfm-bf16"]
    assert parse_config(runs["sfm-fp32"].argv).distill.mixed_precision == "no"
    sfm.outputs = ["synthetic/synthetic.json"]  # Stage III of the check needs its LGM run too: not run here
    for run, stages in ((stage1, None), (sfm, ["distill"])):
        config = parse_config(run.argv)
        config.stages = stages or config.stages
        if run.statistics_from:
            shutil.copytree(run.statistics_from / "statistics", run.folder / "statistics")
        caplog.clear()
        with caplog.at_level("INFO", logger="sfm_hf"):
            run_stages(config, accelerator)
        run.log.write_text("\n".join(record.getMessage() for record in caplog.records))
    synthetic = json.loads((sfm.folder / "synthetic" / "synthetic.json").read_text())
    assert synthetic["distill"]["mixed_precision"] == "bf16" and synthetic["iterations"] == TINY.sfm_steps
    assert ("cpu", torch.bfloat16) in autocasts
    assert synthetic["peak_memory_mib"] is None  # a CUDA allocator figure; none on CPU

    for run, seconds in ((stage1, 1.0), (sfm, 2.0)):
        (run.folder / "launch.json").write_text(json.dumps({"seconds": seconds}))
    # A check cut off before LGM ran still reports what finished.
    figures = gpu_check.collect([stage1, runs["lgm-bf16"], sfm])
    assert not any(name.startswith("LGM") for name in figures)
    assert figures["Stage I images/s"] == json.loads(
        (stage1.folder / "statistics" / "statistics.json").read_text())["images_per_second"] > 0
    assert figures["Stage I s (runner)"] > 0
    assert figures["SFM bf16 s/step"] == pytest.approx(synthetic["seconds"] / TINY.sfm_steps, abs=1e-5)
    assert figures["SFM bf16 peak MiB"] is None and figures["wall s, these launches"] == 3.0
    reference = {"cell": gpu_check.asdict(TINY), "device": "cpu x2", "date": "today", "runs_measured": ["stage1"],
                 "load_average": [1.0, 1.0, 1.0], "figures": {"Stage I images/s": 123.4}}
    reference = json.loads(json.dumps(reference))  # as read from the file: tuples become lists
    table = gpu_check.comparison_table(figures, reference, TINY)
    assert f"| Stage I images/s | 123.4 | {figures['Stage I images/s']} |" in table
    assert "| SFM bf16 peak MiB | n/a | n/a |" in table
    other = gpu_check.comparison_table(figures, {**reference, "cell": gpu_check.asdict(replace(TINY, ipc=10))}, TINY)
    assert "123.4" not in other and "measured with other settings" in other


def test_accuracy_rows_name_the_precision_only_where_it_matters():
    def label(train_set, mode):
        return gpu_check.accuracy_label({"train_set": train_set, "mode": mode}, "bf16")

    assert label("sfm", "ci") == "test acc. % sfm+ci (bf16)" and label("lgm", "vanilla") == "test acc. % lgm (bf16)"
    assert label("random", "vanilla") == "test acc. % random" and label("full_dataset", "golden") == "test acc. % golden"


@pytest.mark.parametrize("installed, lacking", [("5.17.0", True), ("5.19.2", True), ("5.20.0", False), ("5.23.0", False)])
def test_a_transformers_older_than_subconfigspec_makes_the_check_unpack_its_wheels(monkeypatch, installed, lacking):
    # The first GPU run met transformers 5.17, which cannot import configuration_sfm (SubConfigSpec came in 5.20).
    monkeypatch.setattr(gpu_check.importlib.metadata, "version",
                        lambda name: installed if name == "transformers" else "0")
    assert gpu_check.lacks_packages() is lacking


# The DINOv2 cell and the cost comparison (issue 33).

DINO_TINY = replace(gpu_check.CELLS["dinov2_vits14"], image_size=28, syn_res=32, samples_per_split=50, sfm_steps=3,
                    pyramid_every=2, lgm_steps=2, trials=1, eval_iterations=5, view_bank=2)


def test_the_dinov2_cell_runs_the_papers_schedule_from_weights_that_travel_in_float16(tmp_path, digits_dir,
                                                                                      tiny_backbone, capsys):
    paper = gpu_check.CELLS["dinov2_vits14"]
    assert (paper.image_size, paper.syn_res, paper.sfm_steps, paper.pyramid_every, paper.sfm_init) == (
        224, 256, 5000, 200, "noise")
    assets, wheels = tmp_path / "assets", tmp_path / "wheels"
    assets.mkdir()
    wheels.mkdir()
    (assets / "mnist").symlink_to(digits_dir)
    for name, version in gpu_check.WHEEL_PINS:
        write_wheel(wheels / f"{name}-{version}-py3-none-any.whl", name, version)
    exact = Path(tiny_backbone("dinov2"))
    carried = DINO_TINY.carried_folder(assets)
    difference = gpu_check.carry_fp16(exact, carried, 28)
    assert 0 < difference < 1e-2
    assert json.loads((carried / gpu_check.CARRY_RECORD).read_text())["max_abs_feature_difference_28px"] == difference
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(carried / "model.safetensors")).values()} == {torch.float16}
    # Before the device writes the float32 folder, the float16 one is what the inputs need.
    assert gpu_check.main(["--dry-run", "--cell", "dinov2_vits14", *arguments(tmp_path, assets, wheels)],
                          cell=DINO_TINY) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in commands] == ["stage1", "lgm-bf16", "sfm-bf16"]  # no compile run
    assert all(" --config recipes/real_mnist_dinov2_vits14.yaml " in line for line in commands)
    assert "--distill.init noise" in commands[2] and "--distill.syn_res 32" in commands[2]
    restored = gpu_check.materialise_fp32(carried, DINO_TINY.backbone_folder(assets))
    from sfm_hf.backbones import load_backbone

    backbone = load_backbone(str(restored))
    assert next(backbone.parameters()).dtype == torch.float32 and backbone.image_size == 28


def test_a_reference_recorded_before_a_cell_field_existed_still_compares():
    figures = {"Stage I images/s": 1.0}
    reference = {"cell": {key: value for key, value in gpu_check.asdict(TINY).items()
                          if key not in ("backbone", "syn_res", "sfm_init", "precisions", "carry_fp16",
                                         "compile_check")},
                 "device": "cpu", "date": "then", "runs_measured": [], "load_average": [0, 0, 0],
                 "figures": {"Stage I images/s": 7.5}}
    reference = json.loads(json.dumps(reference))
    assert "| Stage I images/s | 7.5 | 1.0 |" in gpu_check.comparison_table(figures, reference, TINY)
    dino = gpu_check.comparison_table(figures, reference, DINO_TINY)
    assert "7.5" not in dino and "measured with other settings" in dino


def test_the_cost_comparison_at_tiny_size_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "cost.json"
    assert gpu_check.main(["--cost", "--tiny", "--device", "cpu", "--runs", str(tmp_path / "runs"),
                           "--json-out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["cost_cell"] == gpu_check.asdict(gpu_check.TINY_COST)
    figures = result["figures"]
    for method in ("SFM", "LGM"):
        assert figures[f"{method} s/step"] > 0 and figures[f"{method} peak MiB"] > 0
        assert figures[f"{method} 5000 steps (min)"] == pytest.approx(figures[f"{method} s/step"] * 5000 / 60, rel=0.01)
    assert figures["LGM / SFM time"] == pytest.approx(figures["LGM s/step"] / figures["SFM s/step"], rel=0.01)
    assert "none of its figures is a GPU figure" in capsys.readouterr().out


def test_an_lgm_that_does_not_fit_is_reported_with_its_checkpointed_rerun():
    sfm = {"median_s": 0.2, "projected_5000_steps_min": 16.7, "memory": {"peak_mib": 16000.0}}
    compared = {"results": {"sfm": sfm, "lgm": {"error": "CUDA out of memory. Tried to allocate 20.00 GiB"}}}
    chunked = {"results": {"lgm": {"median_s": 1.0, "projected_5000_steps_min": 83.3, "memory": {"peak_mib": 60000.0}}}}
    figures = gpu_check.cost_figures(compared, chunked, 100)
    assert figures["LGM error"].startswith("CUDA out of memory")
    assert figures["LGM, checkpoint_chunk 100 s/step"] == 1.0 and figures["LGM, checkpoint_chunk 100 peak MiB"] == 60000.0
    assert figures["LGM / SFM time"] == 5.0
