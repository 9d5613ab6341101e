"""distill.init: auto | noise | centroids | nearest | centroids_noise | random, end to end on the digits (the
pyramid side is in test_pyramid.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from sfm_hf.baselines import centroid_positions, fetch_rows
from sfm_hf.distill.inputs import blend_with_noise, resolve_init, start_images
from sfm_hf.errors import StageInputError
from sfm_hf.pyramid import START_MARGIN
from sfm_hf.runner import run_stages
from sfm_hf.layout import FEATURES_DIR, STATISTICS_DIR
from sfm_hf.statistics import Statistics, load_feature_cache, open_config_split


def config_for(statistics_run, digits_dir, demo_backbone, tmp_path, name, **options):
    output = tmp_path / name
    if not output.exists():
        shutil.copytree(statistics_run, output)
    ipc = options.pop("ipc", 1)
    config = tiny_config(digits_dir, demo_backbone, output, **options)
    config.ipc = ipc
    config.stages = ["distill"]
    return config


def test_centroid_start_at_ipc_one_is_the_centroids_baseline(statistics_run, digits_dir, demo_backbone, tmp_path):
    config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "c1", init="centroids")
    statistics = Statistics.load(statistics_run / STATISTICS_DIR)
    features, labels, indices = load_feature_cache(statistics_run / STATISTICS_DIR / FEATURES_DIR, "train")
    rows = indices[centroid_positions(features, labels, statistics.class_means, 1)]
    expected, expected_labels = fetch_rows(open_config_split(config, "train"), rows, config.distill.syn_res)
    assert expected_labels.tolist() == list(range(10))
    assert torch.equal(start_images(config, statistics), expected)


@pytest.mark.parametrize("init", ["centroids", "nearest", "random"])
def test_real_starts_at_ipc_three_are_distinct_images_of_their_class(
    statistics_run, digits_dir, demo_backbone, tmp_path, init
):
    config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, init, init=init, ipc=3)
    statistics = Statistics.load(statistics_run / STATISTICS_DIR)
    images = start_images(config, statistics)
    assert images.shape == (30, 3, 16, 16)
    flat = images.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 30
    assert torch.equal(images, start_images(config, statistics))


def test_a_run_from_centroids_starts_at_them_and_edits_them(
    statistics_run, digits_dir, demo_backbone, tmp_path, accelerator
):
    runs = {}
    for init in ("noise", "centroids"):
        config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, init, init=init, iterations=30,
                            lr=0.02)
        run_stages(config, accelerator)
        runs[init] = load_file(tmp_path / init / "synthetic" / "images.safetensors")["images"]
    start = start_images(config, Statistics.load(statistics_run / STATISTICS_DIR))
    start = start.clamp(START_MARGIN, 1 - START_MARGIN)
    moved = (runs["centroids"] - start).abs()
    assert moved.max() > 1e-3  # the optimiser edited them
    assert moved.mean() < (runs["noise"] - start).abs().mean() / 2  # ... and they stay near their start


def test_a_real_start_without_stage_one_features_is_a_clear_error(digits_dir, demo_backbone, tmp_path):
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "empty", init="random")
    with pytest.raises(StageInputError, match="distill.init: random"):
        start_images(config, Statistics(class_means=torch.zeros(10, 4), class_counts=torch.ones(10),
                                        class_names=[str(c) for c in range(10)]))


def test_a_real_start_needs_the_dataset_even_with_published_statistics():
    from sfm_hf.config import Config, ConfigError

    config = Config(backbone="b", statistics_from="acme/stats", stages=["distill"])
    config.validate()  # from noise, published statistics are enough
    config.distill.init = "centroids"
    with pytest.raises(ConfigError, match="distill.init: noise"):
        config.validate()


def test_auto_starts_from_centroids_where_stage_one_cached_the_train_rows(
    statistics_run, digits_dir, demo_backbone, tmp_path, accelerator
):
    config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "auto", init="auto", iterations=2)
    assert resolve_init(config) == "centroids"
    run_stages(config, accelerator)
    metadata = json.loads((tmp_path / "auto" / "synthetic" / "synthetic.json").read_text())
    assert metadata["distill"]["init"] == "centroids" and metadata["inputs"]["distill.init"] == "centroids"


def test_auto_falls_back_to_noise_without_cached_rows(statistics_run, digits_dir, demo_backbone, tmp_path):
    config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "streamed", init="auto")
    cache = tmp_path / "streamed" / STATISTICS_DIR / FEATURES_DIR
    for shard in cache.glob("train-*.safetensors"):  # what a streamed split leaves: rows without numbers
        tensors = load_file(shard)
        tensors["indices"] = torch.full_like(tensors["indices"], -1)
        save_file(tensors, shard)
    assert resolve_init(config) == "noise"
    shutil.rmtree(cache)
    assert resolve_init(config) == "noise"
    published = tiny_config(digits_dir, demo_backbone, tmp_path / "published", init="auto")
    published.statistics_from = "acme/stats"
    assert resolve_init(published) == "noise"


def test_the_nearest_start_is_the_ipc_images_nearest_to_the_class_mean(statistics_run, digits_dir, demo_backbone,
                                                                      tmp_path):
    statistics = Statistics.load(statistics_run / STATISTICS_DIR)
    features, labels, indices = load_feature_cache(statistics_run / STATISTICS_DIR / FEATURES_DIR, "train")
    nearest = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "n3", init="nearest", ipc=3)
    distances = torch.cdist(features.float(), statistics.class_means.float())
    expected_rows = torch.cat([
        indices[(labels == c).nonzero().flatten()[distances[labels == c, c].argsort()[:3]]] for c in range(10)
    ])
    expected, _ = fetch_rows(open_config_split(nearest, "train"), expected_rows, nearest.distill.syn_res)
    images = start_images(nearest, statistics)
    assert torch.equal(images, expected)
    # ... which at ipc 3 is not the k-means start (typical images, not ones that cover the class) ...
    kmeans = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "k3", init="centroids", ipc=3)
    assert not torch.equal(images, start_images(kmeans, statistics))
    # ... and at ipc 1 is the same image as it.
    one = {init: start_images(config_for(statistics_run, digits_dir, demo_backbone, tmp_path, f"{init}1", init=init),
                              statistics) for init in ("nearest", "centroids")}
    assert torch.equal(one["nearest"], one["centroids"])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_the_centroids_noise_start_blends_the_centroid_images_with_seeded_noise(
    statistics_run, digits_dir, demo_backbone, tmp_path, weight
):
    statistics = Statistics.load(statistics_run / STATISTICS_DIR)
    centroids = start_images(config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "c", init="centroids"),
                             statistics)
    config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, f"b{weight}", init="centroids_noise",
                        init_noise=weight)
    blended = start_images(config, statistics)
    noise = torch.rand(centroids.shape, generator=torch.Generator().manual_seed(config.seed))
    assert torch.allclose(blended, (1 - weight) * centroids + weight * noise)
    assert torch.equal(blended, blend_with_noise(centroids, weight, config.seed))
    assert blended.min() >= 0 and blended.max() <= 1
    if weight == 0.5:
        # seeded: every process and every rerun draws the same noise; another seed another
        assert torch.equal(blended, start_images(config, statistics))
        assert not torch.equal(blended, blend_with_noise(centroids, weight, config.seed + 1))


def test_the_blend_weight_is_part_of_a_runs_inputs_only_for_the_blended_start(statistics_run, digits_dir,
                                                                            demo_backbone, tmp_path):
    from sfm_hf.distill.checkpoints import synthetic_inputs

    statistics = [Statistics.load(statistics_run / STATISTICS_DIR)]
    inputs = {}
    for init in ("centroids", "centroids_noise"):
        for weight in (0.25, 0.5):
            config = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "w", init=init, init_noise=weight)
            inputs[init, weight] = synthetic_inputs(config, statistics)
    assert inputs["centroids", 0.25] == inputs["centroids", 0.5]
    assert "distill.init_noise" not in inputs["centroids", 0.5]
    assert inputs["centroids_noise", 0.25] != inputs["centroids_noise", 0.5]
    # snapshots are a measurement of the run, not an input of its images
    snapshots = config_for(statistics_run, digits_dir, demo_backbone, tmp_path, "w", init="centroids",
                           snapshot_every=5)
    assert synthetic_inputs(snapshots, statistics) == inputs["centroids", 0.5]
