"""The package as users get it: a wheel installed away from this checkout runs every stage, and the
command line answers without the heavy libraries."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def isolated_env(site: Path, home: Path) -> dict[str, str]:
    """Only the wheel's folder on the path: not this checkout's src/ (PYTHONPATH of the tests) nor its cwd."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home / "hf"),
               OMP_NUM_THREADS="2")
    return env


def build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the checkout gains no build/ or egg-info."""
    source = _mkdir(tmp_path / "source")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "model_cards", source / "model_cards")
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(wheels), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("sfm_hf-*.whl")
    return wheel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.mark.slow
def test_wheel_installed_elsewhere_runs_every_stage_and_exports(tmp_path, digits_dir, tiny_backbone):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(name).decode() for name in names if name.endswith("entry_points.txt"))
    assert {f"sfm_hf/model_cards/{card}.md.j2" for card in ("dataset_card", "model_card", "statistics_card")} <= set(names)
    assert {f"sfm_hf/assets/tiny-vit/{name}" for name in ("config.json", "model.safetensors",
                                                          "preprocessor_config.json", "manifest.json")} <= set(names)
    assert "sfm-hf = sfm_hf.cli:main" in entry_points

    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    work = _mkdir(tmp_path / "elsewhere")  # no recipes/, no model_cards/, no src/ here
    env = isolated_env(site, tmp_path)
    where = subprocess.run([sys.executable, "-c", "import sfm_hf; print(sfm_hf.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where

    recipe = work / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset": str(digits_dir), "backbone": tiny_backbone("vit"), "output_dir": str(work / "run"),
        "stages": ["statistics", "distill", "evaluate", "export"],
        "golden": {"epochs": 5}, "data": {"batch_size": 256},
        "distill": {"iterations": 10, "syn_res": 16, "pyramid_every": 5, "checkpoint_every": 0, "log_every": 5},
        "evaluate": {"trials": 1, "iterations": 5, "train_sets": ["sfm"], "modes": ["ci"], "full_dataset": False,
                     "curve_points": 0},
    }))
    run = subprocess.run([str(site / "bin" / "sfm-hf"), "--config", str(recipe)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "Export:" in run.stdout + run.stderr

    from huggingface_hub import DatasetCard, ModelCard

    output = work / "run"
    assert ModelCard.load(output / "model" / "README.md").data.pipeline_tag == "image-classification"
    assert DatasetCard.load(output / "synthetic" / "README.md").data.task_categories == ["image-classification"]
    assert json.loads((output / "model" / "config.json").read_text())["model_type"] == "sfm"

    help_run = subprocess.run([sys.executable, "-m", "sfm_hf", "--help"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=60)
    assert help_run.returncode == 0 and "--distill.iterations" in help_run.stdout


def test_the_lock_pins_every_dependency_and_make_install_uses_it():
    """A dependency added to setup.cfg without `make lock` would install at whatever version resolves that day."""
    import configparser
    import re

    def name(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]).lower()

    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    locked = {name(package): version for package, version in pins.items()}
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    makefile = (REPO / "Makefile").read_text()
    # The extras `make install` installs (test, docs): each of their packages must be locked too.
    (extras,) = re.findall(r"-e '\.\[([\w,]+)\]'", makefile)
    options = setup["options"]["install_requires"] + "".join(
        "\n" + setup["options.extras_require"][extra] for extra in extras.split(","))
    required = {name(line) for line in options.splitlines() if line.strip()}
    assert required - set(locked) == set()
    assert "sfm-hf" not in locked  # the project itself installs editable from the checkout
    for package, version in re.findall(r"\b(torch|torchvision)==([\w.+]+)", makefile):
        assert locked[package] == version
    install = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "$(LOCK)" in install.splitlines()[0]  # a new lock re-installs
    assert all("-c $(LOCK)" in line for line in install.splitlines() if "pip install" in line)
