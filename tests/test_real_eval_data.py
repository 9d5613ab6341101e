"""What a Stage III training reads (issue 32), on tiny data. By default a training on a synthetic or baseline set sees
its images (through every eval backbone) and the published Stage I outputs only; evaluate.real_eval_data lets it read
real train features through the eval backbones, and every row that did says so (results.json, results.md, plots,
cards). Same-network CI rows are marked wherever they are shown."""

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import sfm_hf.evaluation as evaluation
from conftest import DISTILLED_RUN_SETTINGS, tiny_config
from sfm_hf.evaluation.time_to_quality import curve_label, flat_label, markdown
from sfm_hf.report import REAL_DATA_NOTE, SAME_NETWORK_NOTE, cell, paper_tables, row_label
from sfm_hf.runner import run_stages

SETS = ("random", "centroids", "neighbors_sfm", "sfm")


def cross_config(distilled_run, digits_dir, demo_backbone, other, tmp_path, **options):
    """Stage III of the distilled set on the distillation backbone and another one, with every train set."""
    output = tmp_path / "run"
    shutil.copytree(distilled_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, **DISTILLED_RUN_SETTINGS)
    config.stages = ["evaluate"]
    config.eval_backbones = [demo_backbone, other]
    options = {"train_sets": ["random", "centroids", "neighbors", "sfm"], "trials": 1, "iterations": 20,
               "max_iterations": 20, "view_bank": 8, "curve_points": 2, **options}
    for key, value in options.items():
        setattr(config.evaluate, key, value)
    config.validate()
    return config


def records_by_key(config):
    records = json.loads((Path(config.output_dir) / "results.json").read_text())
    return {(r["train_set"], r["eval_backbone"], r["mode"]): r for r in records}


class GuardedSplit:
    """The real train features of an eval backbone, which only the full-dataset probe (a reference row) may read."""

    def __init__(self, features):
        self.inner = features

    def __getattr__(self, name):
        raise AssertionError(f"a training read the real train split through an eval backbone (.{name})")


def test_by_default_no_training_reads_the_train_split_through_an_eval_backbone(
        distilled_run, digits_dir, demo_backbone, tiny_backbone, tmp_path, accelerator, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sfm_hf")
    features_of_split = evaluation.split_features

    def guarded(config, accelerator, backbone, split, prefix, class_names):
        features = features_of_split(config, accelerator, backbone, split, prefix, class_names)
        return GuardedSplit(features) if prefix == "train" else features

    full_dataset_probe = evaluation._full_dataset_trial

    def reference_row(config, job, model, *args):
        return full_dataset_probe(config, job, dataclasses.replace(model, train=model.train.inner), *args)

    monkeypatch.setattr(evaluation, "split_features", guarded)
    monkeypatch.setattr(evaluation, "_full_dataset_trial", reference_row)
    other = tiny_backbone("dinov2")
    config = cross_config(distilled_run, digits_dir, demo_backbone, other, tmp_path)
    run_stages(config, accelerator)
    records = records_by_key(config)
    for train_set in SETS:  # every image set through every mode, on both backbones
        for backbone in (demo_backbone, other):
            for mode in ("vanilla", "ci"):
                record = records[(train_set, backbone, mode)]
                assert record["real_eval_data"] == [] and record["protocol"] == "fixed"
                assert record["same_network"] is (backbone == demo_backbone)
    assert records[("sfm", demo_backbone, "ci")]["projector_anchors"] == 1.0  # from the statistics
    assert records[("sfm", other, "ci")]["projector_anchors"] == 0.0  # none without real train features
    assert records[("full_dataset", other, "vanilla")]["real_eval_data"] == ["whole train split"]
    table = (Path(config.output_dir) / "results.md").read_text()
    assert "real eval-net data" not in table
    for label in ("Random+CI", "Centroids+CI", "Neighbors (SFM)+CI", "SFM+CI"):
        # Table 2 (same network): every CI cell marked; Table 4: the distillation backbone's column only.
        assert re.search(rf"\| {re.escape(label)} \| \d+\.\d ± \d+\.\d † \|", table), label
        assert re.search(rf"\| {re.escape(label)} \| \d+\.\d ± \d+\.\d † \| \d+\.\d ± \d+\.\d \|", table), label
    assert re.search(r"\| SFM \| \d+\.\d ± \d+\.\d \| \d+\.\d ± \d+\.\d \|", table)
    assert SAME_NETWORK_NOTE in table and REAL_DATA_NOTE not in table
    assert "| SFM+CI |" in caplog.text and SAME_NETWORK_NOTE in caplog.text  # the summary at the end of Stage III


def test_real_eval_data_reads_the_train_split_and_its_rows_say_so(
        distilled_run, digits_dir, demo_backbone, tiny_backbone, tmp_path, accelerator, monkeypatch):
    """With the named option and the default protocol, only the other backbone's anchors read real data: its CI rows
    are labelled, the same-network CI rows (anchors from the statistics) and the vanilla rows are not."""
    read = []
    features_of_split = evaluation.split_features

    def recorded(config, accelerator, backbone, split, prefix, class_names):
        read.append((backbone.name, prefix))
        return features_of_split(config, accelerator, backbone, split, prefix, class_names)

    monkeypatch.setattr(evaluation, "split_features", recorded)
    other = tiny_backbone("dinov2")
    config = cross_config(distilled_run, digits_dir, demo_backbone, other, tmp_path, train_sets=["centroids", "sfm"],
                          full_dataset=False, real_eval_data=True)
    run_stages(config, accelerator)
    assert (other, "train") in read and (demo_backbone, "train") not in read
    records = records_by_key(config)
    for train_set in ("centroids", "sfm"):
        assert records[(train_set, other, "ci")]["real_eval_data"] == ["class-mean anchors"]
        assert records[(train_set, other, "ci")]["projector_anchors"] == 1.0
        for key in ((train_set, demo_backbone, "ci"), (train_set, other, "vanilla"),
                    (train_set, demo_backbone, "vanilla")):
            assert records[key]["real_eval_data"] == []
    table = (Path(config.output_dir) / "results.md").read_text()
    # Table 4: the labelled row holds the other backbone's cell, the plain one the distillation backbone's.
    assert re.search(r"\| SFM\+CI \(real eval-net data\) \| – \| \d+\.\d ± \d+\.\d \|", table)
    assert re.search(r"\| SFM\+CI \| \d+\.\d ± \d+\.\d † \| – \|", table)
    assert re.search(r"\| Centroids\+CI \(real eval-net data\) \| – \| \d+\.\d ± \d+\.\d \|", table)
    assert REAL_DATA_NOTE in table


def test_labels_and_markers_of_rows_curves_and_lines():
    """What the tables, the plots' legends and the time-to-quality outputs call a row."""
    plain = {"train_set": "sfm", "mode": "ci", "mean": 0.5, "std": 0.0, "same_network": False, "real_eval_data": []}
    real = {**plain, "real_eval_data": ["class-mean anchors"]}
    same = {**plain, "same_network": True}
    full = {"train_set": "full_dataset", "mode": "vanilla", "mean": 0.9, "std": 0.0,
            "real_eval_data": ["whole train split"]}
    assert row_label(plain) == "SFM+CI" and cell(plain) == "50.0 ± 0.0"
    assert row_label(real) == "SFM+CI (real eval-net data)"
    assert row_label(same) == "SFM+CI" and cell(same) == "50.0 ± 0.0 †"
    assert cell({**same, "mode": "vanilla"}) == "50.0 ± 0.0"  # a vanilla head on phi_d is no identity
    assert row_label(full) == "Full dataset"
    assert row_label({**real, "mode": "vanilla"}) == "SFM (real eval-net data)"
    curve = {**real, "init": "centroids", "points": [], "eval_backbone": "b", "final_row_mean": None}
    assert curve_label(curve) == "sfm from centroids (ci) (real eval-net data)"
    assert curve_label({**curve, **same}) == "sfm from centroids (ci) †"
    flat = {**same, "train_set": "centroids", "eval_backbone": "b"}
    assert flat_label(flat) == "centroids ci †" and flat_label({**full, "eval_backbone": "b"}) == "full_dataset vanilla"
    text = markdown({"eval_split": "validation", "curves": [curve], "flat": [flat]})
    assert REAL_DATA_NOTE in text and SAME_NETWORK_NOTE in text
    assert SAME_NETWORK_NOTE not in paper_tables([{**plain, "distill_backbone": "a", "eval_backbone": "b"}])
