"""What the recipes choose for the views and the loss: digits never flip; the paper's recipes keep its loss."""

from pathlib import Path

import pytest

from sfm_hf.config import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DIGIT_RECIPES = sorted(RECIPES.glob("real_mnist_*.yaml"))
# The recipes that reproduce the paper's tables (with the authors' evaluation protocol).
PAPER_RECIPES = [recipe for recipe in sorted(RECIPES.glob("*.yaml"))
                 if load_recipe(recipe).evaluate.protocol == "authors"]


def test_the_recipe_lists_are_not_empty():
    assert len(DIGIT_RECIPES) >= 2 and len(PAPER_RECIPES) >= 8


@pytest.mark.parametrize("recipe", DIGIT_RECIPES, ids=lambda path: path.name)
def test_digit_recipes_do_not_flip(recipe):
    """A mirrored digit is another symbol (or none)."""
    config = load_recipe(recipe)
    config.validate()
    assert config.augment.flip is False


def test_the_demo_does_not_flip(tmp_path, monkeypatch):
    from sfm_hf import demo

    # The demo's assets (digits, tiny ViT) play no part in its settings.
    monkeypatch.setattr(demo, "prepare_demo_assets", lambda root: (tmp_path / "digits", tmp_path / "vit"))
    assert demo.demo_config(tmp_path).augment.flip is False


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda path: path.name)
def test_paper_recipes_keep_the_papers_loss_and_views(recipe):
    config = load_recipe(recipe)
    assert config.distill.mean_spread_weight == 0.0
    assert "mean_spread_weight" in recipe.read_text()  # explicit, whatever the library's default
    assert (config.augment.flip, config.augment.crop_scale) == (True, [0.08, 1.0])
    assert (config.distill.noise_p, config.distill.noise_std, config.distill.noise_mean) == (0.5, 0.2, 0.5)
