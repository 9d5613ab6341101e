"""The `augment` section (flip, crop scale) reaches Stage II's and Stage III's views (bad values: test_config.py)."""

import importlib
import json
import shutil

import pytest

from conftest import tiny_config
from sfm_hf.augment import AugmentConfig
from sfm_hf.config import Config
from sfm_hf.errors import UserError
from sfm_hf.runner import run_stages


def recording(monkeypatch, module: str) -> list[AugmentConfig]:
    """Every AugmentConfig that ``module``'s ``augment`` is called with, the call still made."""
    target = importlib.import_module(module)
    real, seen = target.augment, []

    def spy(images, out_size, config, **kwargs):
        seen.append(config)
        return real(images, out_size, config, **kwargs)

    monkeypatch.setattr(target, "augment", spy)
    return seen


def assert_chosen(seen: list[AugmentConfig]) -> None:
    assert seen
    assert {(config.flip_p, config.crop_scale) for config in seen} == {(0.0, (0.5, 0.9))}


def configured(config):
    """``config`` with views no default gives: no flip, crops of 50-90 % of the area."""
    config.augment.flip = False
    config.augment.crop_scale = [0.5, 0.9]
    return config


def test_the_default_views_are_the_papers():
    views = AugmentConfig.from_options(Config().augment)
    assert (views.flip_p, views.crop_scale) == (0.5, (0.08, 1.0)) and views == AugmentConfig()


@pytest.mark.parametrize("method", ["sfm", "lgm"])
def test_stage_two_views_follow_the_augment_section(method, statistics_run, digits_dir, demo_backbone, tmp_path,
                                                    accelerator, monkeypatch):
    """SFM's synthetic views and LGM's synthetic and real views."""
    shutil.copytree(statistics_run, tmp_path / "run")
    config = configured(tiny_config(digits_dir, demo_backbone, tmp_path / "run", iterations=2, method=method))
    config.stages = ["distill"]
    seen = recording(monkeypatch, "sfm_hf.distill.losses")
    run_stages(config, accelerator)
    assert_chosen(seen)
    assert len(seen) == (2 if method == "sfm" else 2 * (1 + 1))  # lgm: one synthetic round and the real batch


def test_other_views_refuse_the_checkpoint_and_are_recorded(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                            accelerator):
    """Images distilled on other views are other images: a resume with another flip or crop is refused."""
    shutil.copytree(statistics_run, tmp_path / "run")
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "run", iterations=10, checkpoint_every=5)
    config.stages = ["distill"]
    run_stages(config, accelerator)
    recorded = json.loads((tmp_path / "run" / "synthetic" / "synthetic.json").read_text())
    assert recorded["augment"] == {"flip": True, "crop_scale": [0.08, 1.0]}
    for key, value in (("flip", False), ("crop_scale", [0.5, 0.9])):
        changed = tiny_config(digits_dir, demo_backbone, tmp_path / "run", iterations=10, checkpoint_every=5)
        changed.stages = ["distill"]
        setattr(changed.augment, key, value)
        with pytest.raises(UserError, match=f"different settings or inputs \\(augment.{key}\\)"):
            run_stages(changed, accelerator)


@pytest.mark.parametrize("view_bank", [0, 3])
def test_stage_three_views_follow_the_augment_section(view_bank, statistics_run, digits_dir, demo_backbone, tmp_path,
                                                      accelerator, monkeypatch):
    """Fresh views (view_bank 0) and banked views alike, for vanilla and CI trainings."""
    shutil.copytree(statistics_run, tmp_path / "run")
    config = configured(tiny_config(digits_dir, demo_backbone, tmp_path / "run"))
    config.stages = ["evaluate"]
    config.evaluate.train_sets = ["random"]
    config.evaluate.baseline_modes = ["vanilla", "ci"]
    config.evaluate.trials = 1
    config.evaluate.iterations = config.evaluate.max_iterations = 4
    config.evaluate.full_dataset = False
    config.evaluate.view_bank = view_bank
    config.validate()
    fresh = recording(monkeypatch, "sfm_hf.evaluation.training")
    banked = recording(monkeypatch, "sfm_hf.evaluation.views")
    run_stages(config, accelerator)
    assert_chosen(banked if view_bank else fresh)
    assert not (fresh if view_bank else banked)
