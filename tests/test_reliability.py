"""Bad inputs and faults (issue #11): each ends with one clear `error:` line (exit 2) or a warning, and no fault
leaves outputs that disagree with their inputs."""

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from sfm_hf.distill import checkpoints, loop, outputs
from sfm_hf.config import Config, ConfigError, load_recipe, parse_config
from sfm_hf.data import DatasetError, load_rgb, open_split
from sfm_hf.errors import UserError
from sfm_hf.layout import RunLayout
from sfm_hf.runner import run_stages
from sfm_hf.statistics import Statistics, StatisticsFileError
from sfm_hf.utils import OutputDirError, OutputDirLock, atomic_path

REPO = Path(__file__).resolve().parents[1]


def recipe_main(argv: list[str]) -> int:
    """recipes/distill.py's main() in-process; the command line's log setup is undone afterwards (caplog)."""
    spec = importlib.util.spec_from_file_location("distill_recipe", REPO / "recipes" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    package = logging.getLogger("sfm_hf")
    saved = package.handlers[:], package.level, package.propagate
    try:
        return module.main(argv)
    finally:
        package.handlers[:], package.level, package.propagate = saved


def run_entry_point(config: Config, capsys, *overrides: str) -> tuple[int, str]:
    """The recipe's main() in-process, as a user runs it; returns (exit status, the one error line)."""
    recipe = Path(config.output_dir).parent / f"{Path(config.output_dir).name}-recipe.yaml"
    config.save(recipe)
    capsys.readouterr()
    status = recipe_main(["--config", str(recipe), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == (1 if status == 2 else 0), err
    return status, errors[0] if errors else ""


def copy_statistics(statistics_run, tmp_path, name="run") -> Path:
    output = tmp_path / name
    shutil.copytree(statistics_run, output)
    return output


def distill_config(dataset, backbone, output, **options) -> Config:
    config = tiny_config(dataset, backbone, output, **{"iterations": 10, "checkpoint_every": 5, **options})
    config.stages = ["distill"]
    return config


# ---------------------------------------------------------------------------------------------
# Command line: values read by the field's declared type, bare boolean flags, stage order.


def base_config() -> Config:
    return Config(dataset="some/data", backbone="some/model")


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--dataset_config", "1.10"], "dataset_config", "1.10"),
        (["--train_split", "0012"], "train_split", "0012"),
        (["--distill.lr", "1e-4"], "distill.lr", 1e-4),
        (["--hub.dataset_config_name", "{backbone}-ipc{ipc}"], "hub.dataset_config_name", "{backbone}-ipc{ipc}"),
        (["--hub.push", "--hub.org", "me", "--ipc", "2"], "hub.push", True),
        (["--hub.org", "me", "--hub.push"], "hub.push", True),
        (["--hub.push", "false"], "hub.push", False),
        (["--hub.push=yes", "--hub.org", "me"], "hub.push", True),
        (["--data.max_samples_per_split", "null"], "data.max_samples_per_split", None),
        (["--eval_backbones", "[a/b, 1.10]"], "eval_backbones", ["a/b", "1.10"]),
        (["--evaluate.kd_alphas", "0.5,1e-1"], "evaluate.kd_alphas", [0.5, 0.1]),
    ],
)
def test_command_line_values_follow_the_declared_type(argv, key, expected):
    config = parse_config(argv, base_config())
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_recipe_values_still_parse_as_yaml(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: d\nbackbone: b\ndistill:\n  lr: 1e-4\n  compile: yes\neval_backbones: [x, y]\n")
    config = load_recipe(recipe)
    assert config.distill.lr == 1e-4 and config.distill.compile is True and config.eval_backbones == ["x", "y"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "distill,statistics"], r"out of order.*write --stages statistics,distill"),
        (["--stages", "statistics,statistics"], r"repeats a stage"),
        (["--distill.lr", "inf"], r"`distill.lr` expects a finite number"),
        (["--distill.lr", "0"], r"`distill.lr` must be > 0"),
        (["--ipc"], r"Option --ipc needs a value"),
        (["--hub.push", "maybe"], r"`hub.push` expects true or false"),
        (["--ipc", "1.5"], r"`ipc` expects an integer"),
    ],
)
def test_bad_command_lines_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, base_config())


# ---------------------------------------------------------------------------------------------
# Checkpoints: never unpickled, unreadable ones named, stale ones refused before config.yaml changes.


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARKER}",))


EXPLOIT_MARKER = Path("/tmp") / f"sfm-hf-exploit-{os.getpid()}"


@pytest.mark.parametrize("content", ["pickle", "empty", "garbage", "truncated"])
def test_unreadable_or_malicious_checkpoint_is_named_and_never_executed(
    statistics_run, digits_dir, demo_backbone, tmp_path, capsys, content
):
    output = copy_statistics(statistics_run, tmp_path)
    config = distill_config(digits_dir, demo_backbone, output)
    path = output / "checkpoints" / "rank00.pt"
    path.parent.mkdir()
    if content == "pickle":
        torch.save({"step": Exploit()}, path)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        torch.save({"levels": [torch.zeros(100, 3, 16, 16)]}, path)
        path.write_bytes(path.read_bytes()[:2000])
    EXPLOIT_MARKER.unlink(missing_ok=True)
    saved = (output / "config.yaml").read_text()
    status, error = run_entry_point(config, capsys)
    assert status == 2
    assert str(path) in error and "Delete" in error
    assert not EXPLOIT_MARKER.exists()
    assert (output / "config.yaml").read_text() == saved and not (output / "synthetic").exists()


def test_checkpoint_holds_only_tensors_and_plain_values(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                        accelerator):
    output = copy_statistics(statistics_run, tmp_path)
    run_stages(distill_config(digits_dir, demo_backbone, output, iterations=10), accelerator)
    state = torch.load(output / "checkpoints" / "rank00.pt", weights_only=True)
    assert state["step"] == 10 and math_isfinite(state["loss"]) and state["seconds"] > 0


def math_isfinite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def test_changed_inputs_refuse_the_checkpoint_and_keep_config_yaml(statistics_run, digits_dir, demo_backbone,
                                                                   tmp_path, accelerator, capsys):
    output = copy_statistics(statistics_run, tmp_path)
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    saved = (output / "config.yaml").read_text()
    images = (output / "synthetic" / "images.safetensors").read_bytes()
    for override, changed in ((["--seed", "5"], "seed"), (["--dataset", str(tmp_path)], "dataset"),
                              (["--train_split", "test", "--eval_split", "train"], "train_split")):
        status, error = run_entry_point(distill_config(digits_dir, demo_backbone, output), capsys, *override)
        assert status == 2 and "different settings or inputs" in error and changed in error
        assert (output / "config.yaml").read_text() == saved
    assert (output / "synthetic" / "images.safetensors").read_bytes() == images


def test_changed_statistics_file_refuses_the_checkpoint(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                        accelerator):
    output = copy_statistics(statistics_run, tmp_path)
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    tensors = load_file(output / "statistics" / "statistics.safetensors")
    tensors["class_means"] = tensors["class_means"] + 0.01
    save_file(tensors, str(output / "statistics" / "statistics.safetensors"))
    with pytest.raises(checkpoints.CheckpointError, match=r"different settings or inputs \(statistics\)"):
        run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)


def test_new_statistics_invalidate_what_was_made_from_the_old(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                              accelerator, make_image_folder):
    output = copy_statistics(statistics_run, tmp_path)
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    (output / "evaluation").mkdir()
    (output / "evaluation" / "results.json").write_text("{}")
    other = make_image_folder(per_class=3)
    config = distill_config(other, demo_backbone, output)
    config.stages = ["statistics", "distill"]
    run_stages(config, accelerator)
    metadata = json.loads((output / "synthetic" / "synthetic.json").read_text())
    assert metadata["class_names"] == ["cat", "dog", "eel"] and metadata["dataset"] == str(other)
    assert metadata["inputs"]["statistics"] == json.loads((output / "statistics" / "statistics.json").read_text())["digest"]
    assert load_file(output / "synthetic" / "images.safetensors")["labels"].tolist() == [0, 1, 2]
    assert torch.load(output / "checkpoints" / "rank00.pt", weights_only=True)["fingerprint"]["dataset"] == str(other)
    assert not (output / "evaluation" / "results.json").exists()


def test_a_finished_distill_is_not_rewritten(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator):
    output = copy_statistics(statistics_run, tmp_path)
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    record = output / "synthetic" / "synthetic.json"
    first = record.read_text()
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    assert record.read_text() == first
    # Without synthetic/ the finished checkpoint re-makes it with the loss and time it recorded.
    shutil.rmtree(output / "synthetic")
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    again, before = json.loads(record.read_text()), json.loads(first)
    assert again["final_loss"] == before["final_loss"] and before["seconds"] > 0
    assert again["seconds"] == pytest.approx(before["seconds"], abs=0.01)


# ---------------------------------------------------------------------------------------------
# The output_dir: a file, not creatable, locked by another run.


@pytest.mark.parametrize("where", ["file", "inside_file", "proc"])
def test_unusable_output_dir_is_one_line(digits_dir, demo_backbone, tmp_path, capsys, where):
    target = {"file": tmp_path / "taken", "inside_file": tmp_path / "taken" / "run",
              "proc": Path("/proc") / "sfm-hf-run"}[where]
    (tmp_path / "taken").write_text("a file")
    config = distill_config(digits_dir, demo_backbone, target)
    recipe = tmp_path / "recipe.yaml"
    config.save(recipe)
    capsys.readouterr()
    assert recipe_main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and "`output_dir`" in err


def test_second_run_on_a_locked_output_dir_fails_naming_the_holder(statistics_run, digits_dir, demo_backbone,
                                                                   tmp_path, accelerator):
    output = copy_statistics(statistics_run, tmp_path)
    saved = (output / "config.yaml").read_text()
    with OutputDirLock(output):
        with pytest.raises(OutputDirError, match=rf"in use by another run \(pid {os.getpid()} "):
            run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    assert (output / "config.yaml").read_text() == saved and not (output / "checkpoints").exists()
    # A lock file left by a run that died holds no lock: the next run takes it over.
    (output / ".lock").write_text("pid 999999 on elsewhere\n")
    run_stages(distill_config(digits_dir, demo_backbone, output), accelerator)
    assert (output / "synthetic" / "synthetic.json").is_file()


def test_temporary_names_are_per_process_and_never_left_behind(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            assert str(os.getpid()) in temporary.name and temporary.suffix == ".json"
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


# ---------------------------------------------------------------------------------------------
# Statistics files.


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot be read"),
    ("shape", "do not belong together"),
    ("nan", "NaN or infinite"),
    ("json", "missing or damaged"),
])
def test_damaged_statistics_are_named(statistics_run, digits_dir, demo_backbone, tmp_path, capsys, damage, message):
    output = copy_statistics(statistics_run, tmp_path)
    tensor_path = output / "statistics" / "statistics.safetensors"
    tensors = load_file(tensor_path)
    if damage == "truncate":
        tensor_path.write_bytes(tensor_path.read_bytes()[:100])
    elif damage == "shape":
        save_file({**tensors, "class_means": tensors["class_means"][:3]}, str(tensor_path))
    elif damage == "nan":
        save_file({**tensors, "class_means": tensors["class_means"] * float("nan")}, str(tensor_path))
    else:
        (output / "statistics" / "statistics.json").write_text("{not json")
    status, error = run_entry_point(distill_config(digits_dir, demo_backbone, output), capsys)
    assert status == 2 and message in error and "statistics" in error and "run the 'statistics' stage" in error
    with pytest.raises(StatisticsFileError):
        Statistics.load(output / "statistics")


# ---------------------------------------------------------------------------------------------
# Datasets.


def write_parquet_dataset(root: Path, labels: dict[str, list]) -> Path:
    import datasets

    (root / "data").mkdir(parents=True)
    for split, values in labels.items():
        images = [Image.new("RGB", (8, 8), (40 * (i % 6), 0, 0)) for i in range(len(values))]
        table = datasets.Dataset.from_dict({"image": images, "label": values},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "label": datasets.Value("string")}))
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no files"):
        open_split(str(tmp_path / "empty"), "train")


def test_swapped_columns(digits_dir):
    with pytest.raises(DatasetError, match="label column 'image' holds images.*swapped"):
        open_split(str(digits_dir), "train", image_column="label", label_column="image")


def test_single_class_is_refused_before_any_image_is_read(make_image_folder, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) \['cat'\].*at least two classes"):
        open_split(str(make_image_folder(classes=("cat",))), "train")
    parquet = write_parquet_dataset(tmp_path / "one", {"train": ["cat"] * 4, "test": ["cat"] * 2})
    monkeypatch.setattr("sfm_hf.data.load_rgb", lambda value: pytest.fail("an image was decoded"))
    with pytest.raises(DatasetError, match=r"1 class\(es\) \['cat'\].*at least two classes"):
        open_split(str(parquet), "train")


def test_labels_differing_only_in_case_warn(tmp_path, caplog):
    parquet = write_parquet_dataset(tmp_path / "case", {"train": ["Cat", "cat", "dog", "dog"]})
    with caplog.at_level(logging.WARNING):
        source = open_split(str(parquet), "train")
    assert source.class_names == ["Cat", "cat", "dog"]
    assert "differ only in case" in caplog.text and "'Cat' / 'cat'" in caplog.text


def test_different_train_and_eval_classes_are_named(tmp_path, demo_backbone, accelerator):
    parquet = write_parquet_dataset(tmp_path / "mismatch", {"train": ["ant", "bee", "cat"], "test": ["ant", "bee", "dog"]})
    config = tiny_config(parquet, demo_backbone, tmp_path / "out")
    config.stages = ["statistics"]
    with pytest.raises(DatasetError, match=r"only in 'train': \['cat'\]; only in 'test': \['dog'\]"):
        run_stages(config, accelerator)


def test_all_eval_images_corrupt(make_image_folder, demo_backbone, tmp_path, accelerator):
    root = make_image_folder(per_class=2)
    for path in (root / "test").rglob("*.png"):
        path.write_bytes(b"\x89PNG broken")
    config = tiny_config(root, demo_backbone, tmp_path / "out")
    config.stages = ["statistics"]
    with pytest.raises(DatasetError, match=r"No usable image in split 'test'.*6 skipped"):
        run_stages(config, accelerator)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", np.full((4, 4), 32768, np.uint16), 128),
    ("I", np.full((4, 4), 65535, np.int32), 255),
    ("I", np.full((4, 4), 100, np.int32), 100),
    ("F", np.full((4, 4), 0.5, np.float32), 128),
])
def test_high_bit_depth_images_are_scaled_not_clipped(mode, values, expected):
    image = Image.fromarray(values)
    buffer = io.BytesIO()
    # A 16-bit PNG opens as I;16; 32-bit integer and float images come from TIFF files.
    image.save(buffer, format="PNG" if mode == "I;16" else "TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
    decoded = np.asarray(load_rgb({"bytes": buffer.getvalue(), "path": None}))
    assert decoded.shape == (4, 4, 3) and (decoded == expected).all()


def test_ipc_larger_than_a_class_is_refused_before_distillation(make_image_folder, statistics_run, digits_dir,
                                                                 demo_backbone, tmp_path, accelerator):
    config = tiny_config(make_image_folder(per_class=3), demo_backbone, tmp_path / "fresh")
    config.stages, config.ipc = ["statistics", "distill", "evaluate"], 4
    with pytest.raises(DatasetError, match=r"`ipc` is 4 but 3 class\(es\) have fewer train images"):
        run_stages(config, accelerator)
    assert not (tmp_path / "fresh" / "synthetic").exists()
    output = copy_statistics(statistics_run, tmp_path)
    saved = (output / "config.yaml").read_text()
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages, config.ipc = ["distill", "evaluate"], 1000
    with pytest.raises(DatasetError, match="`ipc` is 1000"):
        run_stages(config, accelerator)
    assert not (output / "synthetic").exists() and (output / "config.yaml").read_text() == saved


# ---------------------------------------------------------------------------------------------
# Distillation faults and warnings.


def test_non_finite_loss_without_checkpoint_says_so(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator,
                                                    monkeypatch):
    output = copy_statistics(statistics_run, tmp_path)
    original = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda c, images, step: original(c, images, step) * float("nan"))
    with pytest.raises(loop.NonFiniteLossError, match="step 0. No checkpoint was written before it"):
        run_stages(distill_config(digits_dir, demo_backbone, output, checkpoint_every=0, log_every=2), accelerator)
    assert not (output / "synthetic").exists()


def test_saturated_images_warn(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, caplog):
    output = copy_statistics(statistics_run, tmp_path)
    with caplog.at_level(logging.WARNING, logger="sfm_hf.distill"):
        run_stages(distill_config(digits_dir, demo_backbone, output, lr=1e6, checkpoint_every=0), accelerator)
    assert json.loads((output / "synthetic" / "synthetic.json").read_text())["saturated_fraction"] > 0.5
    assert "sit at 0 or 1" in caplog.text
    assert outputs.saturated_fraction(torch.full((2, 3, 4, 4), 0.5)) == 0.0
    assert outputs.saturated_fraction(torch.tensor([0.0, 1.0, 0.5, 0.999])) == 0.75


# ---------------------------------------------------------------------------------------------
# Joint runs (`backbone: [A, B]`): every guarantee above holds for each member's statistics.


@pytest.fixture(scope="module")
def joint_backbones(demo_backbone, tiny_backbone) -> list[str]:
    return [demo_backbone, tiny_backbone("dinov2")]  # 64-d and 32-d features


def joint_config(dataset, backbones, output, **options) -> Config:
    config = distill_config(dataset, backbones[0], output, **options)
    config.backbone = list(backbones)
    config.data.max_samples_per_split = 300
    return config


@pytest.fixture(scope="module")
def joint_statistics_run(tmp_path_factory, digits_dir, joint_backbones):
    """Stage I of a joint run, once; later tests copy its output_dir."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("joint-statistics")
    config = joint_config(digits_dir, joint_backbones, output)
    config.stages = ["statistics"]
    run_stages(config, Accelerator(cpu=True))
    return output


def member_statistics(config: Config, backbone: str) -> Path:
    return RunLayout(config.output_dir).member_dir(backbone) / "statistics"


def test_joint_set_records_every_members_statistics_and_is_not_rewritten(joint_statistics_run, joint_backbones,
                                                                         digits_dir, tmp_path, accelerator):
    output = copy_statistics(joint_statistics_run, tmp_path)
    config = joint_config(digits_dir, joint_backbones, output)
    run_stages(config, accelerator)
    record = output / "synthetic" / "synthetic.json"
    first = record.read_text()
    metadata = json.loads(first)
    assert metadata["inputs"]["backbone"] == joint_backbones
    assert metadata["inputs"]["statistics"] == {
        name: json.loads((member_statistics(config, name) / "statistics.json").read_text())["digest"]
        for name in joint_backbones
    }
    assert 0 <= metadata["saturated_fraction"] <= 1
    run_stages(joint_config(digits_dir, joint_backbones, output), accelerator)
    assert record.read_text() == first


def test_joint_checkpoint_is_refused_when_one_members_statistics_change(joint_statistics_run, joint_backbones,
                                                                        digits_dir, tmp_path, accelerator, capsys):
    output = copy_statistics(joint_statistics_run, tmp_path)
    config = joint_config(digits_dir, joint_backbones, output)
    run_stages(config, accelerator)
    saved = (output / "config.yaml").read_text()
    images = (output / "synthetic" / "images.safetensors").read_bytes()
    tensor_path = member_statistics(config, joint_backbones[1]) / "statistics.safetensors"
    tensors = load_file(tensor_path)
    save_file({**tensors, "class_means": tensors["class_means"] + 0.01}, str(tensor_path))
    status, error = run_entry_point(joint_config(digits_dir, joint_backbones, output), capsys)
    assert status == 2 and "different settings or inputs (statistics)" in error
    assert (output / "config.yaml").read_text() == saved
    assert (output / "synthetic" / "images.safetensors").read_bytes() == images


def test_new_statistics_of_one_member_invalidate_the_joint_set_and_every_members_evaluation(
    joint_statistics_run, joint_backbones, digits_dir, tmp_path, accelerator
):
    output = copy_statistics(joint_statistics_run, tmp_path)
    config = joint_config(digits_dir, joint_backbones, output)
    run_stages(config, accelerator)
    folders = [output, *(RunLayout(config.output_dir).member_dir(name) for name in joint_backbones)]
    for folder in folders:
        (folder / "evaluation" / "features").mkdir(parents=True)
        (folder / "evaluation" / "projectors.safetensors").write_text("made from the old joint set")
        (folder / "evaluation" / "features" / "cache.safetensors").write_text("keyed by its own inputs")
    first, second = (member_statistics(config, name) / "statistics.safetensors" for name in joint_backbones)
    tensors = load_file(first)
    save_file({**tensors, "class_means": tensors["class_means"] + 0.01}, str(first))
    untouched = second.read_bytes()
    config.stages = ["statistics"]
    run_stages(config, accelerator)  # remakes the first member's statistics only
    assert second.read_bytes() == untouched
    assert not (output / "synthetic" / "synthetic.json").exists() and not (output / "checkpoints" / "rank00.pt").exists()
    for folder in folders:
        assert not (folder / "evaluation" / "projectors.safetensors").exists()
        assert (folder / "evaluation" / "features" / "cache.safetensors").is_file()


def test_joint_members_statistics_are_checked_per_member(joint_statistics_run, joint_backbones, digits_dir,
                                                         tmp_path, accelerator, capsys):
    output = copy_statistics(joint_statistics_run, tmp_path)
    config = joint_config(digits_dir, joint_backbones, output)
    saved = (output / "config.yaml").read_text()
    wide, narrow = (member_statistics(config, name) for name in joint_backbones)
    shutil.rmtree(narrow)
    status, error = run_entry_point(joint_config(digits_dir, joint_backbones, output), capsys)
    assert status == 2 and f"{narrow}/statistics.safetensors" in error and "run the 'statistics' stage" in error
    assert (output / "config.yaml").read_text() == saved
    shutil.copytree(wide, narrow)
    # The statistics record the backbone they were made with: refused before the features' width is compared.
    message = (f"The statistics in {narrow} were made with different settings or inputs than this run's (backbone "
               f"'{joint_backbones[0]}' there, '{joint_backbones[1]}' here)")
    with pytest.raises(UserError, match=re.escape(message)):
        run_stages(joint_config(digits_dir, joint_backbones, output), accelerator)
    assert not (output / "synthetic").exists()


# ---------------------------------------------------------------------------------------------
# The exit status under a launcher.


@pytest.mark.slow
def test_launcher_shows_the_one_line_error_and_its_exit_status(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: some/data\nbackbone: some/model\n")
    command = [sys.executable, "-m", "sfm_hf.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "recipes" / "distill.py"),
               "--config", str(recipe), "--ipc", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: `ipc` must be >= 1, got 0."
    ]
