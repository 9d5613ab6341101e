"""Hostile inputs and faults of issue #36: each ends in one `error:` line naming the file or option (nothing
half-written), a warning where the input is legal but likely wrong, or the right result where one was wrong."""

import errno
import fcntl
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from sfm_hf.backbones import BackboneError, load_backbone
from sfm_hf.config import ConfigError, load_recipe, parse_config
from sfm_hf.data import DatasetError, load_rgb, open_split
from sfm_hf.distill import loop
from sfm_hf.merge import MergeError, merge_statistics
from sfm_hf.runner import run_stages
from test_reliability import base_config, copy_statistics, distill_config, recipe_main, run_entry_point


def saved_state(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` (but the lock), to show that a refused run changed nothing."""
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture(scope="module")
def finished_run(statistics_run, digits_dir, demo_backbone, tmp_path_factory):
    """Stage I + a short Stage II + export, once (copy before changing it)."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(statistics_run, output)
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = ["distill", "export"]
    run_stages(config, Accelerator(cpu=True))
    return output


# ---------------------------------------------------------------------------------------------
# Silent wrong results.


@pytest.mark.parametrize("override, named", [
    ("dataset", "dataset"),
    ("max_samples", "data.max_samples_per_split"),
    ("crop_ratio", "data.crop_ratio"),
])
@pytest.mark.parametrize("stage", ["distill", "export"])
def test_statistics_made_from_other_inputs_are_refused_before_anything_is_written(
    finished_run, digits_dir, demo_backbone, make_image_folder, tmp_path, capsys, override, named, stage
):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    if stage == "distill":  # statistics alone, as a run that stopped after Stage I left them
        for later in ("synthetic", "checkpoints", "model"):
            shutil.rmtree(output / later)
    before = saved_state(output)
    overrides = {"dataset": ["--dataset", str(make_image_folder(per_class=2))],
                 "max_samples": ["--data.max_samples_per_split", "50"],
                 "crop_ratio": ["--data.crop_ratio", "0.5"]}[override]
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = [stage]
    status, error = run_entry_point(config, capsys, *overrides)
    assert status == 2 and f"The statistics in {output / 'statistics'}" in error and named in error
    assert "add 'statistics' to --stages" in error
    assert saved_state(output) == before


def test_the_same_dataset_spelt_otherwise_is_accepted(statistics_run, digits_dir, demo_backbone, tmp_path, capsys):
    output = copy_statistics(statistics_run, tmp_path)
    status, _ = run_entry_point(distill_config(digits_dir, demo_backbone, output), capsys,
                                "--dataset", f"{digits_dir}/")
    assert status == 0 and (output / "synthetic" / "images.safetensors").is_file()


def test_export_refuses_settings_the_images_were_not_made_with(finished_run, digits_dir, demo_backbone, tmp_path,
                                                                capsys):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    before = saved_state(output)
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = ["export"]
    status, error = run_entry_point(config, capsys, "--distill.lr", "0.5", "--distill.iterations", "999", "--seed", "7")
    assert status == 2 and f"{output / 'synthetic'} holds images made with different settings" in error
    assert "distill.lr 0.002 there, 0.5 here" in error and "distill.iterations 10 there, 999 here" in error
    assert "seed 0 there, 7 here" in error
    assert saved_state(output) == before


def test_export_writes_the_config_that_made_the_images(finished_run, digits_dir, demo_backbone, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = ["export"]
    # Logging and checkpoint settings do not change the images: export runs, and still publishes the recorded ones.
    status, _ = run_entry_point(config, capsys, "--distill.log_every", "3", "--distill.checkpoint_every", "7")
    assert status == 0
    recorded = json.loads((output / "synthetic" / "synthetic.json").read_text())["config"]
    assert recorded["stages"] == ["distill", "export"] and recorded["distill"]["log_every"] == 10
    for published in (output / "model" / "config.yaml", output / "statistics" / "config.yaml",
                      next((output / "synthetic" / "data").glob("*/config.yaml"))):
        values = yaml.safe_load(published.read_text())
        assert values["stages"] == ["distill", "export"] and values["distill"]["log_every"] == 10
        assert values["distill"]["checkpoint_every"] == 5 and values["distill"]["lr"] == 0.002
        assert str(tmp_path) not in published.read_text() and str(finished_run) not in published.read_text()


@pytest.mark.parametrize("mode, values", [
    ("I;16", (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)),
    ("I", (np.arange(64).reshape(8, 8) * 1000).astype(np.int32)),
    ("I", (np.arange(64).reshape(8, 8) * 3).astype(np.int32)),
    ("F", (np.arange(64).reshape(8, 8) / 63).astype(np.float32)),
])
def test_the_bundle_decodes_high_bit_depth_images_as_stage_one_does(mode, values):
    from sfm_hf.modeling_sfm import eight_bit_image

    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG" if mode == "I;16" else "TIFF")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == mode
    expected = np.asarray(load_rgb({"bytes": buffer.getvalue(), "path": None}))
    assert np.array_equal(np.asarray(eight_bit_image(image).convert("RGB")), expected)


def test_the_bundle_pipeline_classifies_a_16_bit_png_as_its_8_bit_twin(finished_run, digits_dir, tmp_path):
    import datasets
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(finished_run / "model"), trust_remote_code=True)
    assert type(classify).__name__ == "SFMImageClassificationPipeline"
    rows = datasets.load_dataset(str(digits_dir), split="test")
    for index in range(3):
        grey = np.asarray(rows[index]["image"].convert("L"))
        Image.fromarray(grey).save(tmp_path / "8bit.png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
        assert Image.open(tmp_path / "16bit.png").mode == "I;16"
        for picture in (str(tmp_path / "16bit.png"), Image.open(tmp_path / "16bit.png")):
            assert classify(picture) == classify(str(tmp_path / "8bit.png"))


def test_an_empty_class_folder_is_refused(make_image_folder):
    root = make_image_folder()
    for path in (root / "train" / "eel").iterdir():
        path.unlink()
    shutil.rmtree(root / "test" / "eel")
    with pytest.raises(DatasetError, match=r"Class folder\(s\) \['eel'\] in '.*/train' hold no image"):
        open_split(str(root), "train")


@pytest.mark.parametrize("side", [1, 3])
def test_synthetic_images_below_the_backbone_input_warn(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                        accelerator, caplog, side):
    output = copy_statistics(statistics_run, tmp_path)
    with caplog.at_level(logging.WARNING, logger="sfm_hf.distill"):
        run_stages(distill_config(digits_dir, demo_backbone, output, syn_res=side, iterations=2), accelerator)
    assert f"distill.syn_res {side} is below the 28-px input of backbone" in caplog.text
    assert "(auto gives 32)" in caplog.text


def test_evaluating_on_the_train_split_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="`eval_split` and `train_split` are both 'train'"):
        parse_config(["--eval_split", "train"], base_config())


# ---------------------------------------------------------------------------------------------
# Memory: synthetic images that cannot fit are refused before anything is allocated.


def test_synthetic_images_that_cannot_fit_are_refused_before_stage_one(digits_dir, demo_backbone, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr("sfm_hf.distill.inputs.available_memory", lambda device: 2**20)
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "run", syn_res=64)
    config.stages = ["statistics", "distill"]
    status, error = run_entry_point(config, capsys)
    assert status == 2 and "`distill.syn_res` 64 needs about 1.1 MiB for at least 2 synthetic images" in error
    assert "CPU memory has 1.0 MiB available: lower `distill.syn_res`" in error
    assert not (tmp_path / "run" / "statistics").exists()


def test_synthetic_images_that_cannot_fit_are_refused_before_distilling(statistics_run, digits_dir, demo_backbone,
                                                                        tmp_path, capsys, monkeypatch):
    output = copy_statistics(statistics_run, tmp_path)
    monkeypatch.setattr("sfm_hf.distill.inputs.available_memory", lambda device: 2**20)
    status, error = run_entry_point(distill_config(digits_dir, demo_backbone, output, syn_res=64), capsys)
    assert status == 2 and "for 10 synthetic images of 64x64 px" in error
    assert not (output / "synthetic").exists() and not (output / "checkpoints").exists()


def test_the_memory_estimate_refuses_the_issue_case_without_allocating():
    from sfm_hf.distill.inputs import check_memory
    from sfm_hf.errors import UserError
    from sfm_hf.utils import available_memory

    config = base_config()
    config.distill.syn_res = 100000
    assert available_memory("cpu") > 0
    with pytest.raises(UserError, match=r"needs about 13,411.0 GiB for 10 synthetic images"):
        check_memory(config, 10, torch.device("cpu"))
    config.distill.syn_res = 32
    check_memory(config, 10, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Tracebacks that are now one line.


def test_help_into_a_closed_pipe_is_quiet():
    """`sfm-hf --help | head -1`: a pipe of one page, closed after the first line, so the next write must fail."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: the help (20 KB) cannot all fit before the reader leaves
    import sfm_hf

    env = {**os.environ, "PYTHONPATH": str(Path(sfm_hf.__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "sfm_hf", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                               env=env)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline().startswith(b"sfm-hf: ")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and err == b""


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: [a\nbackbone: b\n")
    with pytest.raises(ConfigError, match=rf"Recipe '{recipe}' is not valid YAML: line 2, column 9: .*expected"):
        load_recipe(recipe)
    recipe.write_bytes(b"dataset: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_recipe(recipe)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARKER}",))


EXPLOIT_MARKER = Path("/tmp") / f"sfm-hf-backbone-exploit-{os.getpid()}"


@pytest.mark.parametrize("damage, message", [
    ("no_weights", r"Cannot load the weights of backbone .*OSError: .*no file named model.safetensors"),
    ("truncated", r"Cannot load the weights of backbone .*SafetensorError"),
    ("random_bytes", r"Cannot load the weights of backbone .*SafetensorError"),
    ("pickle", r"UnpicklingError: a pickle holding objects other than tensors, which is never loaded"),
    ("file", r"is a file: give the folder that holds the model"),
    ("text_model", r"\(bert\) is not a vision encoder: its model reads 'input_ids', not images"),
])
def test_a_broken_or_foreign_backbone_is_one_line(demo_backbone, tmp_path, damage, message):
    folder = tmp_path / "backbone"
    shutil.copytree(demo_backbone, folder)
    weights = folder / "model.safetensors"
    name = str(folder)
    if damage == "no_weights":
        weights.unlink()
    elif damage == "truncated":
        truncate(weights, 3000)
    elif damage == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif damage == "pickle":
        tensors = load_file(weights)
        weights.unlink()
        torch.save({**tensors, "extra": Exploit()}, folder / "pytorch_model.bin")
    elif damage == "file":
        name = str(folder / "config.json")
    else:
        import transformers

        shutil.rmtree(folder)
        transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        )).save_pretrained(folder)
    EXPLOIT_MARKER.unlink(missing_ok=True)
    with pytest.raises(BackboneError, match=message):
        load_backbone(name)
    assert not EXPLOIT_MARKER.exists()


def test_a_full_disk_is_one_line_and_leaves_complete_files(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                           capsys, monkeypatch):
    output = copy_statistics(statistics_run, tmp_path)
    saved = torch.save

    def save_on_a_full_disk(state, path):
        saved(state, path)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr("sfm_hf.distill.checkpoints.torch.save", save_on_a_full_disk)
    monkeypatch.setattr("sfm_hf.utils.shutil.disk_usage", lambda path: types.SimpleNamespace(free=0))
    status, error = run_entry_point(distill_config(digits_dir, demo_backbone, output), capsys)
    assert status == 2
    assert error.startswith(f"error: No space left on the device while writing {output / 'checkpoints' / 'rank00.pt'}")
    assert "run the same command again" in error
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == []
    # A writer that raises OSError itself (PIL, pyarrow, text) is caught at the command line.
    monkeypatch.undo()
    monkeypatch.setattr("sfm_hf.distill.outputs.save_preview",
                        lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", "x.png")))
    status, error = run_entry_point(distill_config(digits_dir, demo_backbone, output), capsys)
    assert status == 2 and error.startswith("error: No space left on the device while writing x.png")


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(statistics_run, digits_dir, demo_backbone, tmp_path, capsys,
                                                    monkeypatch):
    output = copy_statistics(statistics_run, tmp_path)
    original = loop.train_step

    def interrupted_at_step_7(context, images, optimizer, step):
        if step == 7:
            raise KeyboardInterrupt
        return original(context, images, optimizer, step)

    monkeypatch.setattr(loop, "train_step", interrupted_at_step_7)
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = ["distill", "export"]
    recipe = tmp_path / "recipe.yaml"
    config.save(recipe)
    capsys.readouterr()
    assert recipe_main(["--config", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"stopped: interrupted during stage 'distill'. Kept: Stage II's checkpoint of step 5 in {output / 'checkpoints'}."
        " To go on, run the same command with --stages distill,export (distillation resumes from its checkpoint)."
    ]
    monkeypatch.undo()
    assert recipe_main(["--config", str(recipe), "--stages", "distill"]) == 0
    assert f"Stage II: resuming from step 5 ({output / 'checkpoints'})" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_truncated_synthetic_images_are_named(finished_run, digits_dir, demo_backbone, tmp_path, capsys, stage):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    truncate(output / "synthetic" / "images.safetensors")
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = [stage]
    config.evaluate.train_sets = ["sfm"]
    status, error = run_entry_point(config, capsys)
    assert status == 2
    assert error.startswith(f"error: {output / 'synthetic' / 'images.safetensors'} cannot be read (SafetensorError")
    assert "truncated or not a file of synthetic images; delete it and run the 'distill' stage again" in error


def test_a_truncated_feature_cache_shard_is_named(finished_run, digits_dir, demo_backbone, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    shard = next((output / "statistics" / "features").glob("eval-*.safetensors"))
    truncate(shard)
    config = distill_config(digits_dir, demo_backbone, output)
    config.stages = ["evaluate"]
    config.evaluate.train_sets = ["sfm"]
    status, error = run_entry_point(config, capsys)
    assert status == 2 and error.startswith(f"error: {shard} cannot be read (SafetensorError")
    assert f"not a feature-cache shard; delete {output / 'statistics' / 'features'} and run the 'statistics'" in error


def test_merging_a_truncated_statistics_folder_is_named(statistics_run, tmp_path):
    shard = tmp_path / "shard"
    shutil.copytree(statistics_run / "statistics", shard)
    truncate(shard / "statistics.safetensors")
    with pytest.raises(MergeError, match=rf"{shard / 'statistics.safetensors'} cannot be read \(SafetensorError.*"
                                         r"re-run the 'statistics' stage of that shard"):
        merge_statistics([shard, statistics_run / "statistics"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("argv, message", [
    (["--trackers", "nosuchtracker"], r"Unknown tracker\(s\) \['nosuchtracker'\] in `trackers`; accelerate knows"),
    (["--seed", "-1"], r"`seed` must be an integer from 0 to 2\*\*32 - 1"),
    (["--seed", str(2**40)], r"`seed` must be an integer from 0 to 2\*\*32 - 1 = 4294967295 .*got 1099511627776"),
    (["--data.num_workers", "-1"], r"`data.num_workers` must be >= 0"),
    (["--data.max_samples_per_split", "0"], r"`data.max_samples_per_split` must be >= 1 \(or null"),
])
def test_out_of_range_options_are_refused_at_config_time(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, base_config())


def test_seed_and_trackers_at_their_limits_are_accepted():
    config = parse_config(["--seed", str(2**32 - 1), "--trackers", "tensorboard,all"], base_config())
    assert config.seed == 2**32 - 1 and config.trackers == ["tensorboard", "all"]


def test_the_demo_notice_names_what_the_command_line_replaced():
    from sfm_hf.cli import demo_notice

    assert demo_notice({}) == "No --config given: running the embedded demo recipe (scikit-learn digits, tiny ViT)."
    assert demo_notice({"dataset": "d", "backbone": "b"}) == (
        "No --config given: the embedded demo recipe's settings with the dataset and backbone given.")
    assert demo_notice({"dataset": "d"}) == (
        "No --config given: the embedded demo recipe's settings with the dataset given (and the demo's tiny ViT).")


def test_ctrl_c_while_the_libraries_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C before run()'s own handler is in place (importing torch and transformers takes seconds)."""
    from sfm_hf import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "show_progress_logs", interrupted)
    assert cli.main(["--dataset", "some/data", "--backbone", "some/model"]) == 130
    assert capsys.readouterr().err == "stopped: interrupted before any stage started.\n"
