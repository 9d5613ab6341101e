import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.backbones import load_backbone
from sfm_hf.config import GoldenOptions
from sfm_hf.data import DatasetError, load_rgb, open_split, resize_center_crop
from sfm_hf.runner import run_stages
from sfm_hf.statistics import Statistics, load_feature_cache, load_golden_classifier


def test_statistics_equal_a_plain_loop(statistics_run, digits_dir, demo_backbone):
    statistics = Statistics.load(statistics_run / "statistics")
    backbone = load_backbone(demo_backbone)
    source = open_split(str(digits_dir), "train")
    sums = torch.zeros(10, backbone.feature_dim, dtype=torch.float64)
    counts = torch.zeros(10, dtype=torch.int64)
    with torch.no_grad():
        for row in source.dataset:
            array = resize_center_crop(load_rgb(row["image"]), backbone.image_size, 0.875)
            pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
            sums[row["label"]] += backbone(pixels)[0].double()
            counts[row["label"]] += 1
    assert torch.equal(statistics.class_counts, counts)
    torch.testing.assert_close(statistics.class_means, (sums / counts[:, None]).float(), rtol=1e-5, atol=1e-6)
    metadata = json.loads((statistics_run / "statistics" / "statistics.json").read_text())
    assert metadata["images_seen"] == 1347 and metadata["images_skipped"] == 0
    assert metadata["class_names"] == [str(d) for d in range(10)]
    assert metadata["backbone"]["feature_dim"] == backbone.feature_dim


def test_feature_cache_holds_every_train_image_in_row_order(statistics_run):
    features, labels, indices = load_feature_cache(statistics_run / "statistics" / "features", "train")
    assert features.dtype == torch.float16 and features.shape[0] == 1347
    assert torch.equal(indices, torch.arange(1347))
    statistics = Statistics.load(statistics_run / "statistics")
    for c in range(10):
        torch.testing.assert_close(features[labels == c].float().mean(0), statistics.class_means[c], atol=2e-3, rtol=1e-2)


def test_golden_classifier_is_far_above_chance(statistics_run):
    report = json.loads((statistics_run / "statistics" / "golden_classifier.json").read_text())
    assert report["eval_images"] == 450
    assert report["eval_accuracy"] > 0.5  # chance is 0.1
    head = load_golden_classifier(statistics_run / "statistics")
    tensors = load_file(statistics_run / "statistics" / "golden_classifier.safetensors")
    assert head.weight.shape == tensors["weight"].shape == (10, 64)
    features, labels, _ = load_feature_cache(statistics_run / "statistics" / "features", "eval")
    accuracy = (head(features.float()).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(report["eval_accuracy"])


@pytest.mark.slow
def test_golden_classifier_matches_scikit_learn_logistic_regression(statistics_run):
    """The converged golden classifier is scikit-learn's LogisticRegression at the same penalty, on the same cached
    features of the digits: both minimise one strictly convex objective (mean CE + l2/2 ||W||^2, bias free, which
    is C = 1 / (l2 n) in scikit-learn's sum form), so their predictions agree whatever the features are. The penalty
    itself is ours, chosen on a validation slice of the train features; comparing it with scikit-learn's own
    cross-validated C measured only how two selections happened to fall on one install's features."""
    from sklearn.linear_model import LogisticRegression

    report = json.loads((statistics_run / "statistics" / "golden_classifier.json").read_text())
    assert report["recipe"] == "converged" and report["l2"] in GoldenOptions().l2_grid
    assert 0 < report["validation_accuracy"] <= 1 and report["validation_images"] >= 10
    cache = statistics_run / "statistics" / "features"
    train_features, train_labels, _ = load_feature_cache(cache, "train")
    eval_features, eval_labels, _ = load_feature_cache(cache, "eval")
    reference = LogisticRegression(C=1.0 / (report["l2"] * len(train_labels)), max_iter=10000, tol=1e-8)
    reference.fit(train_features.float().numpy(), train_labels.numpy())
    sklearn_predictions = torch.from_numpy(reference.predict(eval_features.float().numpy()))
    golden = load_golden_classifier(statistics_run / "statistics")
    with torch.no_grad():
        our_predictions = golden(eval_features.float()).argmax(1)
    agreement = (our_predictions == sklearn_predictions).float().mean().item()
    sklearn_accuracy = (sklearn_predictions == eval_labels).float().mean().item()
    print(f"golden {report['eval_accuracy']:.4f} (l2 {report['l2']:g}), scikit-learn at the same penalty "
          f"{sklearn_accuracy:.4f}, prediction agreement {agreement:.4f}")
    assert agreement >= 0.99
    assert report["eval_accuracy"] == pytest.approx(sklearn_accuracy, abs=0.005)


def test_authors_golden_recipe_is_kept(statistics_run):
    from sfm_hf.probe import fit_reference_probe

    features, labels, _ = load_feature_cache(statistics_run / "statistics" / "features", "train")
    options = GoldenOptions(recipe="authors", epochs=2)
    head, fitted = fit_reference_probe(options, features, labels, 10, seed=0)
    again, _ = fit_reference_probe(options, features, labels, 10, seed=0)
    assert torch.equal(head.weight, again.weight)
    assert fitted["recipe"] == "authors" and fitted["lr"] == 5e-4 and fitted["batch_size"] == 128
    assert fitted["steps"] == 2 * math.ceil(len(labels) / 128)


def test_both_non_target_centres(statistics_run):
    statistics = Statistics.load(statistics_run / "statistics")
    means, counts = statistics.class_means.double(), statistics.class_counts.double()
    c = 3
    class_mean_form = (means.sum(0) - means[c]) / 9
    sample_form = ((means * counts[:, None]).sum(0) - means[c] * counts[c]) / (counts.sum() - counts[c])
    torch.testing.assert_close(statistics.flow("class_mean")[c].double(), class_mean_form - means[c], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(statistics.flow("sample")[c].double(), sample_form - means[c], atol=1e-5, rtol=1e-5)


def test_empty_class_is_a_clear_error(make_image_folder, tmp_path, demo_backbone, accelerator):
    root = make_image_folder(classes=("a", "b", "c"), per_class=2)
    for image in (root / "train" / "b").iterdir():
        image.unlink()
    (root / "train" / "b" / "broken.png").write_bytes(b"nope")  # keeps the class folder, and so the class
    config = tiny_config(root, demo_backbone, tmp_path / "out")
    config.stages = ["statistics"]
    with pytest.raises(DatasetError, match=r"1 class\(es\) have no image in split 'train'.*\['b'\]"):
        run_stages(config, accelerator)
