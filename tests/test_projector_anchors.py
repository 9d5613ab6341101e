"""Stage III's cross-network CI options on tiny data: class-mean anchors of the projector fit
(evaluate.projector_anchors), the ridge penalty chosen on validation (evaluate.ridge_choice) and the fused predictor
(mode fused, evaluate.fusion_weights)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.backbones import load_backbone
from sfm_hf.config import ConfigError, EvaluateOptions, load_recipe
from sfm_hf.evaluation import TrialSetup, train_trial
from sfm_hf.evaluation.features import EvalBackbone, FeatureSet
from sfm_hf.evaluation.trainers import fit_ridge_projector
from sfm_hf.runner import run_stages
from sfm_hf.statistics import Statistics, load_feature_cache, load_golden_classifier

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def parts(statistics_run, demo_backbone, tiny_backbone):
    """The demo backbone (phi_d, 64-d) with its golden classifier, a smaller other backbone (phi_e, 32-d), ten
    images, and per class phi_e / phi_d anchor pairs (random: only their effect on the fit is tested here)."""
    distill = load_backbone(demo_backbone)
    other = load_backbone(tiny_backbone("dinov2"))
    golden = load_golden_classifier(statistics_run / "statistics").requires_grad_(False)
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    anchors = (torch.randn(10, other.feature_dim, generator=generator),
               torch.randn(10, distill.feature_dim, generator=generator))
    return distill, other, golden, images, anchors


def cross_setup(parts, anchors=None, validation=(None, None), trained=None, **options):
    distill, other, golden, images, _ = parts
    settings = EvaluateOptions(**{"iterations": 40, "max_iterations": 40, "curve_points": 0, "lr": 0.02,
                                  "projector_lr": 0.05, **options})
    features = other(images)
    return TrialSetup(images, torch.arange(10), other, distill, golden, features, torch.arange(10), settings,
                      3407, *validation, anchors=anchors, trained={} if trained is None else trained)


def anchor_error(projector, anchors) -> float:
    with torch.no_grad():
        return float((projector(anchors[0]) - anchors[1]).pow(2).mean())


@pytest.mark.parametrize("projector", ["sgd", "ridge"])
def test_anchors_pull_the_projector_fit_towards_the_class_mean_pairs(parts, projector):
    anchors = parts[4]
    options = {"projector": projector, "ridge_views": 200, "ridge_lambdas": [1e-3]}
    plain = train_trial(cross_setup(parts, **options), "ci")
    anchored = train_trial(cross_setup(parts, anchors, **options, projector_anchors=1.0), "ci")
    assert plain.details["projector_anchors"] == 0.0 and anchored.details["projector_anchors"] == 1.0
    assert not torch.allclose(plain.projector.weight, anchored.projector.weight)
    assert anchor_error(anchored.projector, anchors) < 0.5 * anchor_error(plain.projector, anchors)
    if projector == "ridge":
        # Ten affine pairs in 32 dimensions can be met exactly: a heavy weight makes the solve interpolate them.
        heavy = fit_ridge_projector(cross_setup(parts, anchors, **options, projector_anchors=1e6))[0]
        assert anchor_error(heavy, anchors) < 1e-3 * anchor_error(plain.projector, anchors)


class _Unread:
    """A split whose features must not be read: any access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"real train features read ({name})")


def test_same_network_anchors_come_from_the_statistics_alone(statistics_run, demo_backbone):
    """On the distillation backbone both sides of an anchor pair are Stage I's class mean (the published
    statistics): no real train feature is read, whatever real_eval_data says."""
    from sfm_hf.evaluation import _OnDevice

    statistics = Statistics.load(statistics_run / "statistics")
    cache = statistics_run / "statistics" / "features"
    model = EvalBackbone(demo_backbone, None, FeatureSet(*load_feature_cache(cache, "eval")), _Unread())
    for real in (False, True):
        on_device = _OnDevice(EvaluateOptions(real_eval_data=real), "cpu", statistics, demo_backbone)
        anchors = on_device.anchors(model)
        assert torch.equal(anchors[0], statistics.class_means.float())
        assert torch.equal(anchors[1], statistics.class_means.float())
        assert not on_device.real_anchors(model)
    assert _OnDevice(EvaluateOptions(projector_anchors=0.0), "cpu", statistics, demo_backbone).anchors(model) is None
    assert _OnDevice(EvaluateOptions(modes=["vanilla"], baseline_modes=["vanilla"]), "cpu", statistics,
                     demo_backbone).anchors(model) is None


def test_cross_network_anchors_are_the_eval_backbones_train_class_means_only_with_real_eval_data(statistics_run,
                                                                                                  demo_backbone):
    """On another eval backbone: no anchors by default (its train features are not read); with real_eval_data, its
    mean TRAIN feature per class (never the eval split) -> Stage I's class mean. The demo backbone's cache under
    another name stands in for that backbone, so its train means are Stage I's class means (float16 rounding apart)."""
    from sfm_hf.evaluation import _OnDevice

    statistics = Statistics.load(statistics_run / "statistics")
    cache = statistics_run / "statistics" / "features"
    evaluation = FeatureSet(*load_feature_cache(cache, "eval"))
    unread = EvalBackbone("other", None, evaluation, _Unread())
    assert _OnDevice(EvaluateOptions(), "cpu", statistics, demo_backbone).anchors(unread) is None
    model = EvalBackbone("other", None, evaluation, FeatureSet(*load_feature_cache(cache, "train")))
    on_device = _OnDevice(EvaluateOptions(real_eval_data=True), "cpu", statistics, demo_backbone)
    anchors = on_device.anchors(model)
    assert on_device.real_anchors(model)
    torch.testing.assert_close(anchors[0], statistics.class_means, atol=2e-3, rtol=0)
    assert torch.equal(anchors[1], statistics.class_means.float())
    eval_means = torch.stack([evaluation.features[evaluation.labels == c].float().mean(0)
                              for c in range(statistics.num_classes)])
    assert not torch.allclose(anchors[0], eval_means, atol=2e-3)


def test_ridge_choice_validation_picks_the_penalty_that_scores_best_on_the_validation_slice(parts):
    """Between no shrinkage and an overwhelming one (P -> the mean of phi_d: one class for every image), the
    validation labels alone decide: each candidate wins on a slice labelled with its own predictions."""
    lambdas = [1e-6, 1e12]
    rows = parts[1](torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(2)))

    def predictions(lam):
        projector = fit_ridge_projector(cross_setup(parts, projector="ridge", ridge_views=200,
                                                    ridge_lambdas=[lam]))[0]
        return parts[2](projector(rows)).argmax(1)

    loose, shrunk = predictions(lambdas[0]), predictions(lambdas[1])
    assert not torch.equal(loose, shrunk)
    for labels, expected in ((loose, 0), (shrunk, 1)):
        setup = cross_setup(parts, validation=(rows, labels), projector="ridge", ridge_views=200,
                            ridge_lambdas=lambdas, ridge_choice="validation")
        _, chosen = fit_ridge_projector(setup)
        grid_scale = fit_ridge_projector(cross_setup(parts, projector="ridge", ridge_views=200,
                                                     ridge_lambdas=[1.0]))[1]["ridge_lambda"]
        assert chosen["ridge_choice"] == "validation"
        assert chosen["ridge_lambda"] == pytest.approx(lambdas[expected] * grid_scale)


def test_fused_reuses_the_trials_vanilla_and_ci_and_chooses_its_weight_on_validation(parts):
    rows = parts[1](torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    trained: dict = {}
    dummy = torch.zeros(len(rows), dtype=torch.long)
    vanilla = train_trial(cross_setup(parts, validation=(rows, dummy), trained=trained), "vanilla")
    ci = train_trial(cross_setup(parts, validation=(rows, dummy), trained=trained), "ci")
    head_says, ci_says = vanilla.predictor(rows).argmax(1), ci.predictor(rows).argmax(1)
    assert not torch.equal(head_says, ci_says)
    for labels, weight in ((head_says, 0.0), (ci_says, 1.0)):
        fused = train_trial(cross_setup(parts, validation=(rows, labels), trained=trained, fusion_weights=[0.0, 1.0]),
                            "fused")
        assert fused.details["fusion_weight"] == weight and fused.details["validation_accuracy"] == 1.0
        assert fused.predictor.head is vanilla.predictor and fused.predictor.inherited is ci.predictor  # reused
        assert fused.details["steps"] == vanilla.details["steps"] + ci.details["steps"]
        assert fused.curve == [] and fused.details["projector_fit"] == "sgd"
    # Alone, fused trains the same vanilla head and CI projector (same seed, same views) itself.
    alone = train_trial(cross_setup(parts, validation=(rows, ci_says), fusion_weights=[0.0, 1.0]), "fused")
    torch.testing.assert_close(alone.predictor.head.weight, vanilla.predictor.weight)
    torch.testing.assert_close(alone.projector.weight, ci.projector.weight)


def test_a_run_records_the_anchors_the_ridge_choice_and_the_fused_rows(distilled_run_for_fused, digits_dir,
                                                                         demo_backbone, accelerator):
    config = tiny_config(digits_dir, demo_backbone, distilled_run_for_fused, **FUSED_RUN_SETTINGS)
    config.stages = ["evaluate"]
    options = config.evaluate
    options.train_sets, options.modes, options.trials = ["sfm"], ["fused", "ci", "vanilla"], 2
    options.protocol, options.real_eval_data = "converge", True
    options.iterations = options.max_iterations = 60
    options.projector, options.ridge_views, options.ridge_choice = "ridge", 200, "validation"
    options.full_dataset, options.curve_points = False, 0
    config.validate()
    run_stages(config, accelerator)
    records = {r["mode"]: r for r in json.loads((distilled_run_for_fused / "results.json").read_text())}
    fused, ci = records["fused"], records["ci"]
    assert fused["projector_anchors"] == ci["projector_anchors"] == 1.0 and "projector_anchors" not in records["vanilla"]
    # Same network: the anchors come from the statistics; the rest read real train features, and the records say so.
    assert records["vanilla"]["real_eval_data"] == ["plateau check"]
    assert ci["real_eval_data"] == ["ridge penalty"]  # one solve: no SGD cycles, no plateau check
    assert fused["real_eval_data"] == ["plateau check", "fusion weight", "ridge penalty"]
    assert ci["ridge_choice"] == "validation" and len(ci["ridge_lambda"]) == 2
    assert fused["ridge_lambda"] == ci["ridge_lambda"]  # the trial's ci projector, reused
    assert len(fused["fusion_weight"]) == 2 and all(w in options.fusion_weights for w in fused["fusion_weight"])
    # Weight 0 is the vanilla head: the chosen mix is at least as good on the validation slice.
    assert fused["validation_accuracy"] >= records["vanilla"]["validation_accuracy"] - 1e-9
    table = (distilled_run_for_fused / "results.md").read_text()
    assert "| SFM+fused (real eval-net data) |" in table and "| SFM+CI (real eval-net data) |" in table
    assert "| SFM+CI |" not in table and "| SFM (real eval-net data) |" in table


# Stage II settings of `distilled_run_for_fused`, which its evaluation must repeat (images made with other
# settings are refused).
FUSED_RUN_SETTINGS = {"iterations": 20, "pyramid_every": 10, "lr": 0.02}


@pytest.fixture
def distilled_run_for_fused(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator):
    output = tmp_path / "run"
    shutil.copytree(statistics_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, **FUSED_RUN_SETTINGS)
    config.stages = ["distill"]
    run_stages(config, accelerator)
    return output


@pytest.mark.parametrize("options, message", [
    ({"projector_anchors": -1.0}, "`evaluate.projector_anchors` must be >= 0"),
    ({"projector_anchors": math.nan}, "`evaluate.projector_anchors` must be >= 0"),
    ({"ridge_choice": "eval"}, "`evaluate.ridge_choice` must be one of"),
    ({"fusion_weights": []}, "`evaluate.fusion_weights` needs values in"),
    ({"fusion_weights": [0.5, 1.5]}, "`evaluate.fusion_weights` needs values in"),
    ({"ridge_choice": "validation"}, "`evaluate.ridge_choice: validation` reads real .* `evaluate.real_eval_data: true`"),
    ({"modes": ["vanilla", "fused"]}, "mode fused reads real .* `evaluate.real_eval_data: true`"),
    ({"baseline_modes": ["fused"]}, "mode fused reads real .* `evaluate.real_eval_data: true`"),
    ({"protocol": "converge"}, "`evaluate.protocol: converge` reads real .* `evaluate.real_eval_data: true`"),
])
def test_cross_network_options_are_checked(options, message, digits_dir, demo_backbone, tmp_path):
    config = tiny_config(digits_dir, demo_backbone, tmp_path)
    for key, value in options.items():
        setattr(config.evaluate, key, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()
    if "real_eval_data" in message:  # the named switch allows it, under any protocol
        config.evaluate.real_eval_data = True
        config.validate()


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_paper_reproduction_recipes_keep_the_papers_projector(recipe):
    """Recipes under the authors' protocol reproduce the paper: Eq. 10 alone, no class-mean anchors."""
    config = load_recipe(recipe)
    if config.evaluate.protocol == "authors":
        assert config.evaluate.projector_anchors == 0.0
