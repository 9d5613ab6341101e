"""Merging Stage I outputs of disjoint shards: exactly one pass over the union, or a clear refusal."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.errors import StageInputError
from sfm_hf.hub import hub_sources
from sfm_hf.merge import main, merge_for_run, merge_statistics
from sfm_hf.runner import run_stages
from sfm_hf.layout import FEATURES_DIR
from sfm_hf.statistics import Statistics, load_feature_cache, load_golden_classifier
from sfm_hf.utils import save_tensors_atomically

BACKBONE = {"name": "acme/tiny", "family": "vit", "feature": "cls", "feature_dim": 2, "image_size": 28,
            "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def half_runs(digits_dir, demo_backbone, tmp_path_factory):
    """Stage I on each of two disjoint halves of the digits train split (each with the whole test split)."""
    from accelerate import Accelerator

    from sfm_hf.demo import split_train_split

    folders = []
    for half in split_train_split(digits_dir, 2, tmp_path_factory.mktemp("digit-halves")):
        config = tiny_config(half, demo_backbone, half.with_name(f"run-{half.name}"))
        config.stages = ["statistics"]
        run_stages(config, Accelerator(cpu=True))
        folders.append(Path(config.output_dir) / "statistics")
    return folders


@pytest.mark.slow
def test_two_halves_merged_equal_one_pass_over_the_whole(half_runs, statistics_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main([*map(str, half_runs), "--output", str(merged)]) == 0
    assert "Merged 2 shards: 1347 images of 10 classes; golden classifier refitted" in capsys.readouterr().out

    one = load_file(statistics_run / "statistics" / "statistics.safetensors")
    two = load_file(merged / "statistics.safetensors")
    halves = [load_file(folder / "statistics.safetensors") for folder in half_runs]
    assert all(0 < half["class_counts"].sum() < 1347 for half in halves)
    assert torch.equal(two["class_counts"], one["class_counts"])
    torch.testing.assert_close(two["class_sums"], one["class_sums"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two["class_means"], one["class_means"], rtol=0, atol=1e-6)
    metadata = json.loads((merged / "statistics.json").read_text())
    assert metadata["class_names"] == [str(digit) for digit in range(10)] and metadata["images_seen"] == 1347
    assert [shard["images_seen"] for shard in metadata["merged_from"]] == [673, 674]

    # The merged cache is the halves' rows in order, i.e. the one-pass cache; the golden classifier is refitted.
    features, labels, _ = load_feature_cache(merged / FEATURES_DIR, "train")
    one_features, one_labels, _ = load_feature_cache(statistics_run / "statistics" / FEATURES_DIR, "train")
    assert torch.equal(labels, one_labels)
    torch.testing.assert_close(features, one_features, rtol=1e-2, atol=1e-3)
    report = json.loads((merged / "golden_classifier.json").read_text())
    assert report["eval_images"] == 450 and len(report["eval_sources"]) == 1  # both halves scored the same split
    assert report["eval_accuracy"] > 0.5  # chance is 0.1
    assert load_golden_classifier(merged).weight.shape == (10, 64)


@pytest.mark.slow
def test_statistics_from_a_list_merges_once_and_distils(half_runs, digits_dir, demo_backbone, tmp_path, accelerator,
                                                        monkeypatch):
    config = tiny_config("", demo_backbone, tmp_path / "run", iterations=10)
    config.statistics_from = [str(folder) for folder in half_runs]
    config.stages = ["distill"]
    config.validate()
    run_stages(config, accelerator)
    merged = Statistics.load(tmp_path / "run" / "statistics")
    assert merged.metadata["images_seen"] == 1347 and merged.num_classes == 10
    images = load_file(tmp_path / "run" / "synthetic" / "images.safetensors")["images"]
    assert images.shape == (10, 3, 16, 16)

    import sfm_hf.merge

    def must_not_merge_again(*args, **kwargs):
        raise AssertionError("the merge was up to date")

    monkeypatch.setattr(sfm_hf.merge, "_write_merge", must_not_merge_again)
    assert merge_for_run(config) == tmp_path / "run" / "statistics"
    config.golden.epochs += 1  # another golden classifier: the merge is redone
    with pytest.raises(AssertionError, match="up to date"):
        merge_for_run(config)


# ---------------------------------------------------------------------------------------------
# Hand-made shards: exact arithmetic, class unions, label remapping, refusals.


def make_shard(folder, names, sums, counts, *, features=None, labels=None, **metadata):
    """A Stage I output folder with the given float64 sums, counts and (optionally) a train feature cache."""
    sums, counts = torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)
    recorded = {"backbone": BACKBONE, "preprocessing": "centre crop 28", "non_target": "class_mean",
                "dataset": folder.name, "split": "train", "images_seen": int(counts.sum()), **metadata}
    Statistics((sums / counts[:, None]).float(), counts, list(names), recorded).save(folder, class_sums=sums)
    if features is not None:
        (folder / FEATURES_DIR).mkdir()
        for prefix in ("train", "eval"):
            save_tensors_atomically(
                {"features": torch.tensor(features).half(), "labels": torch.tensor(labels),
                 "indices": torch.arange(len(labels))},
                folder / FEATURES_DIR / f"{prefix}-rank00-00000.safetensors",
            )
        recorded_fit = {"eval_split": "test", "recipe": "authors", "epochs": 60, "lr": 0.05, "seed": 1}
        (folder / "golden_classifier.json").write_text(json.dumps(recorded_fit))
    return folder


def blobs(ids_by_direction, per_class=20):
    """Separable 2-d features: class id k sits around the unit vector at angle ids_by_direction[k]."""
    generator = torch.Generator().manual_seed(0)
    features, labels = [], []
    for label, angle in enumerate(ids_by_direction):
        centre = torch.tensor([torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))]) * 3
        features.append(centre + 0.3 * torch.randn(per_class, 2, generator=generator))
        labels += [label] * per_class
    return torch.cat(features).tolist(), labels


def test_class_sets_are_unioned_by_name_and_labels_remapped(tmp_path):
    # Shard A knows cat, dog; shard B knows dog, eel with dog as id 0. Each class has its own direction.
    directions = {"cat": 0.0, "dog": 2.0, "eel": 4.0}
    features_a, labels_a = blobs([directions["cat"], directions["dog"]])
    features_b, labels_b = blobs([directions["dog"], directions["eel"]])
    a = make_shard(tmp_path / "a", ["cat", "dog"], [[1.0, 2.0], [3.0, 4.0]], [2, 3], features=features_a,
                   labels=labels_a)
    b = make_shard(tmp_path / "b", ["dog", "eel"], [[5.0, 6.0], [7.0, 8.0]], [1, 4], features=features_b,
                   labels=labels_b)
    merged = merge_statistics([a, b], tmp_path / "merged")
    assert merged.class_names == ["cat", "dog", "eel"]  # the first shard's order, then new names
    assert merged.class_counts.tolist() == [2, 4, 4]
    sums = load_file(tmp_path / "merged" / "statistics.safetensors")["class_sums"]
    assert sums.tolist() == [[1.0, 2.0], [8.0, 10.0], [7.0, 8.0]]
    torch.testing.assert_close(merged.class_means, torch.tensor([[0.5, 1.0], [2.0, 2.5], [1.75, 2.0]]))

    _, labels, _ = load_feature_cache(tmp_path / "merged" / FEATURES_DIR, "train")
    assert labels.tolist() == [0] * 20 + [1] * 20 + [1] * 20 + [2] * 20
    # Refitted with the first shard's recorded settings on remapped labels: every direction gets its own name.
    report = json.loads((tmp_path / "merged" / "golden_classifier.json").read_text())
    assert (report["recipe"], report["epochs"], report["lr"], report["seed"]) == ("authors", 60, 0.05, 1)
    assert report["eval_images"] == 80 and report["eval_accuracy"] > 0.95
    head = load_golden_classifier(tmp_path / "merged")
    probes = torch.tensor([[3 * torch.cos(torch.tensor(a)), 3 * torch.sin(torch.tensor(a))] for a in directions.values()])
    assert head(probes).argmax(1).tolist() == [0, 1, 2]


def test_without_feature_caches_the_golden_classifier_is_missing_and_says_why(tmp_path, capsys):
    a = make_shard(tmp_path / "a", ["cat", "dog"], [[1.0, 2.0], [3.0, 4.0]], [2, 3])
    b = make_shard(tmp_path / "b", ["cat", "dog"], [[5.0, 6.0], [7.0, 8.0]], [1, 4])
    assert main([str(a), str(b), "--output", str(tmp_path / "merged")]) == 0
    assert "no golden classifier" in capsys.readouterr().out
    assert not (tmp_path / "merged" / "golden_classifier.safetensors").exists()
    assert Statistics.load(tmp_path / "merged").class_counts.tolist() == [3, 7]
    with pytest.raises(StageInputError, match=r"No golden classifier in .*merged: these are merged statistics.*"
                                              r"kept no feature cache"):
        load_golden_classifier(tmp_path / "merged")


def shard_pairs(tmp_path):
    """(name, first, second, extra arguments, expected message) for each refused merge."""
    names, sums, counts = ["cat", "dog"], [[1.0, 2.0], [3.0, 4.0]], [2, 3]
    base = make_shard(tmp_path / "base", names, sums, counts)
    other_backbone = make_shard(tmp_path / "other-backbone", names, sums, counts, backbone={**BACKBONE, "name": "x"})
    other_crop = make_shard(tmp_path / "other-crop", names, sums, counts, preprocessing="centre crop 32")
    other_centre = make_shard(tmp_path / "other-centre", names, sums, counts, non_target="sample")
    renamed = make_shard(tmp_path / "renamed", ["n01", "n02"], sums, counts)
    means_only = make_shard(tmp_path / "means-only", names, sums, counts)
    save_tensors_atomically(
        {key: value for key, value in load_file(means_only / "statistics.safetensors").items() if key != "class_sums"},
        means_only / "statistics.safetensors",
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    return [
        ("backbone", [base, other_backbone], "differ in `backbone`"),
        ("preprocessing", [base, other_crop], "differ in `preprocessing`.*centre crop 32"),
        ("non-target centre", [base, other_centre], "differ in `non_target`"),
        ("class names", [base, renamed], "shares no class name.*--allow-disjoint-classes"),
        ("means only", [base, means_only], "no float64 `class_sums`"),
        ("not statistics", [base, foreign], "holds no Stage I statistics"),
        ("twice", [base, base], "listed twice"),
    ]


def test_incompatible_shards_are_refused_with_one_error_line(tmp_path, capsys):
    for what, folders, message in shard_pairs(tmp_path):
        output = tmp_path / f"out-{what}"
        assert main([*map(str, folders), "--output", str(output)]) == 2, what
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error, (what, error)
        assert re.search(message, error), (what, error)
        assert not output.exists(), what  # nothing written
    base, renamed = tmp_path / "base", tmp_path / "renamed"
    assert main([str(base), str(renamed), "--output", str(tmp_path / "union"), "--allow-disjoint-classes"]) == 0
    assert Statistics.load(tmp_path / "union").class_names == ["cat", "dog", "n01", "n02"]


def test_the_output_must_be_a_new_folder_or_an_earlier_merge(tmp_path, capsys):
    a = make_shard(tmp_path / "a", ["cat"], [[1.0, 2.0]], [2])
    b = make_shard(tmp_path / "b", ["cat"], [[3.0, 4.0]], [1])
    assert main([str(a), str(b), "--output", str(a)]) == 2
    assert "is one of the folders to merge" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "statistics.json").write_text("{}")
    assert main([str(a), str(b), "--output", str(foreign)]) == 2
    assert "not an earlier merge" in capsys.readouterr().err and (foreign / "statistics.json").read_text() == "{}"
    for _ in range(2):  # merging again into an earlier merge replaces it
        assert main([str(a), str(b), "--output", str(tmp_path / "merged")]) == 0
    assert load_file(tmp_path / "merged" / "statistics.safetensors")["class_sums"].tolist() == [[4.0, 6.0]]


def test_every_hub_repo_of_a_statistics_list_is_checked():
    from sfm_hf.config import Config

    config = Config(backbone="acme/tiny", statistics_from=["acme/site-a", "acme/site-b"], stages=["distill"])
    assert {repo for what, repo, _ in hub_sources(config) if what == "statistics repo"} == {"acme/site-a",
                                                                                           "acme/site-b"}


def test_other_processes_wait_for_the_main_process_merge(tmp_path, monkeypatch):
    import threading

    import accelerate

    import sfm_hf.merge
    from sfm_hf.config import Config

    a = make_shard(tmp_path / "a", ["cat"], [[1.0, 2.0]], [2])
    b = make_shard(tmp_path / "b", ["cat"], [[3.0, 4.0]], [1])
    config = Config(backbone="acme/tiny", output_dir=str(tmp_path / "run"), statistics_from=[str(a), str(b)])

    class OtherRank:
        is_main_process = False

    monkeypatch.setattr(accelerate, "PartialState", OtherRank)
    waiting = threading.Thread(target=merge_for_run, args=(config,), daemon=True)
    waiting.start()
    waiting.join(timeout=3)
    assert waiting.is_alive() and not (tmp_path / "run" / "statistics" / "statistics.json").exists()
    merge_statistics([a, b], tmp_path / "run" / "statistics", golden=config.golden, seed=config.seed)  # the main rank
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    monkeypatch.setattr(sfm_hf.merge, "_write_merge", None)  # a non-main rank never writes
    assert merge_for_run(config) == tmp_path / "run" / "statistics"
