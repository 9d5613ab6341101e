"""The export stage: offline round trips of the three folders, publishing through a patched HfApi,
statistics-only distillation and the fast failure for unreachable Hub repos."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from sfm_hf.errors import UserError
from sfm_hf.export.dataset_folder import quantise
from sfm_hf.export.facts import ExportError, PublishError, source_license
from sfm_hf.names import slug
from sfm_hf.hub import HubAccessError, check_sources, statistics_dir
from sfm_hf.runner import run_stages

TOKEN = "hf_dummyTokenThatMustNeverBeWritten0123456789"
PROJECTOR = "evaluation/projectors/sfm-ci.safetensors"


def card_metadata(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def run(output, digits_dir, backbone, accelerator, stages, **hub):
    config = tiny_config(digits_dir, backbone, output, iterations=20)
    config.stages = stages
    for key, value in hub.items():
        setattr(config.hub, key, value)
    run_stages(config, accelerator)
    return config


@pytest.fixture(scope="module")
def distilled(statistics_run, digits_dir, demo_backbone, tmp_path_factory):
    """Stage I + a short Stage II on the digits, shared by the tests below (copy before writing)."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("distilled") / "run"
    shutil.copytree(statistics_run, output)
    run(output, digits_dir, demo_backbone, Accelerator(cpu=True), ["distill"])
    return output


# Another environment than this one's, as when Stage III ran elsewhere: the cards must name the results' versions.
RESULTS_VERSIONS = {"python": "3.11.7", "torch": "2.14.1", "transformers": "5.99.0", "timm": None}


def write_results(output: Path, backbone: str, feature_dim: int, accuracy: float = 0.8125) -> dict:
    """A Stage III results.json as the evaluate stage writes it, with a trained-looking CI projector."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.eye(feature_dim) + 0.05 * torch.randn(feature_dim, feature_dim, generator=generator)
    (output / PROJECTOR).parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight, "bias": 0.01 * torch.randn(feature_dim, generator=generator)}, str(output / PROJECTOR))
    common = dict(distill_backbone=backbone, eval_backbone=backbone, trials=5, ipc=1, iterations=1000, seconds=1.0,
                  versions=RESULTS_VERSIONS)
    # Same network (eval = distillation backbone): anchors from the statistics; this one was trained under the
    # real-data plateau check (evaluate.real_eval_data), which its cards must say.
    ci = dict(train_set="sfm", mode="ci", mean=0.80, std=0.01, per_trial=[0.8] * 5, projector=PROJECTOR,
              projector_accuracy=accuracy, projector_anchors=1.0, same_network=True,
              real_eval_data=["plateau check"], **common)
    records = [
        dict(train_set="random", mode="vanilla", mean=0.41, std=0.03, per_trial=[0.41] * 5, same_network=True,
             real_eval_data=[], **common),
        dict(train_set="sfm", mode="vanilla", mean=0.62, std=0.02, per_trial=[0.62] * 5, same_network=True,
             real_eval_data=[], **common),
        ci,
    ]
    (output / "results.json").write_text(json.dumps(records))
    return ci


@pytest.fixture(scope="module")
def exported(distilled, digits_dir, demo_backbone, tmp_path_factory):
    """The distilled run with Stage III results, exported once."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(distilled, output)
    record = write_results(output, demo_backbone, 64)
    run(output, digits_dir, demo_backbone, Accelerator(cpu=True), ["export"], license="cc-by-4.0")
    return output, record


# ---------------------------------------------------------------------------------------------
# synthetic/


def test_dataset_folder_loads_offline_with_names_and_exact_pixels(exported, digits_dir):
    import datasets

    output, _ = exported
    folder = output / "synthetic"
    synthetic = datasets.load_dataset(str(folder), split="train")
    float_images = load_file(folder / "images.safetensors")
    class_names = json.loads((output / "statistics" / "statistics.json").read_text())["class_names"]
    assert len(synthetic) == 10
    assert synthetic.features["label"].names == class_names == [str(d) for d in range(10)]
    assert synthetic["label"] == float_images["labels"].tolist()
    image = synthetic[3]["image"]
    assert image.size == (16, 16) and image.mode == "RGB"
    pixels = torch.stack([torch.from_numpy(np.array(row["image"])) for row in synthetic])
    assert torch.equal(pixels, quantise(float_images["images"]))  # PNG is lossless after 8-bit quantisation
    assert (pixels.float() / 255 - float_images["images"].permute(0, 2, 3, 1)).abs().max() <= 0.5 / 255 + 1e-6


def test_float_images_beside_the_parquet_are_bit_exact(exported):
    output, _ = exported
    config_dirs = sorted((output / "synthetic" / "data").iterdir())
    assert len(config_dirs) == 1
    original = load_file(output / "synthetic" / "images.safetensors")
    copied = load_file(config_dirs[0] / "images.safetensors")
    assert torch.equal(copied["images"], original["images"]) and torch.equal(copied["labels"], original["labels"])


def test_dataset_card_metadata(exported, demo_backbone):
    output, _ = exported
    metadata = card_metadata(output / "synthetic" / "README.md")
    config_name = slug(demo_backbone)
    assert metadata["license"] == "cc-by-4.0"
    assert metadata["task_categories"] == ["image-classification"] and metadata["size_categories"] == ["n<1K"]
    assert metadata["configs"] == [{"config_name": config_name, "default": True, "data_files": [
        {"split": "train", "path": f"data/{config_name}/train-*.parquet"}]}]
    info = metadata["dataset_info"]
    assert info["config_name"] == config_name
    assert info["splits"][0]["num_examples"] == 10 and info["splits"][0]["num_bytes"] > 0
    assert info["download_size"] == (output / "synthetic" / "data" / config_name / "train-00000-of-00001.parquet").stat().st_size
    assert metadata["sfm"]["method"] == "sfm" and metadata["sfm"]["ipc"] == 1 and metadata["sfm"]["iterations"] == 20
    body = (output / "synthetic" / "README.md").read_text()
    assert f"data/{config_name}/preview.png" in body and "81.2%" not in body  # the table shows means, not P's score
    assert "80.0% ± 1.0% †" in body and "41.0% ± 3.0% |" in body and "62.0% ± 2.0% |" in body
    assert "| ci + class-mean anchors (real eval-net data: plateau check) |" in body
    assert "| vanilla + class-mean anchors" not in body and "| vanilla (real eval-net data" not in body
    assert "† same network" in body


def test_source_license_comes_from_the_source_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-sa-4.0\n---\n# a dataset\n")
    assert source_license(str(tmp_path)) == "cc-by-sa-4.0"
    assert source_license(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------------------------
# model/


def direct_logits(output: Path, backbone_name: str, images: torch.Tensor) -> torch.Tensor:
    """golden(P(phi_e(x))) from the raw files and backbones.py: what the bundle must reproduce."""
    from sfm_hf.backbones import load_backbone

    backbone = load_backbone(backbone_name)
    projector = load_file(output / PROJECTOR)
    golden = load_file(output / "statistics" / "golden_classifier.safetensors")
    with torch.no_grad():
        projected = backbone(images) @ projector["weight"].T + projector["bias"]
        return projected @ golden["weight"].T + golden["bias"], backbone.preprocess(images)


def test_model_card_accuracy_is_the_bundles_projector_accuracy(exported):
    output, record = exported
    metadata = card_metadata(output / "model" / "README.md")
    (result,) = metadata["model-index"][0]["results"]
    assert result["metrics"][0]["type"] == "accuracy"
    assert result["metrics"][0]["value"] == pytest.approx(record["projector_accuracy"])
    assert result["dataset"]["split"] == "test"
    assert metadata["pipeline_tag"] == "image-classification" and metadata["license"] == "cc-by-4.0"
    body = (output / "model" / "README.md").read_text()
    assert "81.2%" in body and "Storage" in body and "4,810 float32 parameters" in body
    # Same network: the projector's anchors are the published statistics' class means (no real image), and the card
    # says that its accuracy is the golden classifier's, and what real data its training read (results.json).
    assert "class-mean anchor pair per class from the published statistics" in body
    assert "real class-mean anchor" not in body and "synthetic images only" not in body
    assert "**Same network:**" in body and "**Real eval-net data:**" in body and "for: plateau check" in body


def test_bundle_reproduces_golden_of_projected_features_in_process(exported, demo_backbone):
    from transformers import AutoModelForImageClassification

    output, _ = exported
    images = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    expected, pixels = direct_logits(output, demo_backbone, images)
    model = AutoModelForImageClassification.from_pretrained(output / "model").eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert model.config.id2label == {k: str(k) for k in range(10)}
    assert (output / "model" / "preprocessor_config.json").is_file()


SUBPROCESS = r'''
import json, sys
sys.modules["sfm_hf"] = None  # as on a machine where sfm-hf is not installed
try:
    import sfm_hf
except ImportError:
    pass
else:
    raise SystemExit("sfm_hf was importable")
from pathlib import Path
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

model_dir, pixels_path, images_dir, out = sys.argv[1:]
model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.load(pixels_path)).logits
classify = pipeline("image-classification", model=model_dir, trust_remote_code=True)
images = [Image.open(path) for path in sorted(Path(images_dir).glob("*.png"))]
top1 = [result[0]["label"] for result in classify(images, top_k=1)]
Path(out).write_text(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "top1": top1}))
'''


def test_bundle_loads_and_classifies_where_sfm_hf_is_not_importable(exported, demo_backbone, tmp_path):
    import datasets
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    output, _ = exported
    images = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    expected, pixels = direct_logits(output, demo_backbone, images)
    torch.save(pixels, tmp_path / "pixels.pt")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index, row in enumerate(datasets.load_dataset(str(output / "synthetic"), split="train")):
        row["image"].save(pictures / f"{index:02d}.png")
    script = tmp_path / "load.py"
    script.write_text(SUBPROCESS)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(output / "model"), str(tmp_path / "pixels.pt"), str(pictures),
         str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads((tmp_path / "out.json").read_text())
    assert answer["module"].startswith("transformers_modules.")  # the bundled remote code, not sfm_hf
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-4)
    model = AutoModelForImageClassification.from_pretrained(output / "model").eval()
    processor = AutoImageProcessor.from_pretrained(output / "model")
    inputs = processor([Image.open(path) for path in sorted(pictures.glob("*.png"))], return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).tolist()
    assert answer["top1"] == [model.config.id2label[k] for k in predicted]


def test_identity_projector_without_evaluation(distilled, digits_dir, demo_backbone, tmp_path, accelerator):
    output = tmp_path / "run"
    shutil.copytree(distilled, output)
    run(output, digits_dir, demo_backbone, accelerator, ["export"])
    golden = json.loads((output / "statistics" / "golden_classifier.json").read_text())
    metadata = card_metadata(output / "model" / "README.md")
    value = metadata["model-index"][0]["results"][0]["metrics"][0]["value"]
    assert value == pytest.approx(golden["eval_accuracy"], abs=1e-6)
    assert "identity" in (output / "model" / "README.md").read_text()
    weights = load_file(output / "model" / "model.safetensors")
    assert torch.equal(weights["projector.weight"], torch.eye(64))
    assert "license" not in card_metadata(output / "synthetic" / "README.md")  # the digits folder has no card


def test_other_eval_backbone_without_projector_is_a_clear_error(distilled, digits_dir, demo_backbone, tiny_backbone,
                                                                 tmp_path, accelerator):
    output = tmp_path / "run"
    shutil.copytree(distilled, output)
    with pytest.raises(ExportError, match="run the 'evaluate' stage"):
        run(output, digits_dir, demo_backbone, accelerator, ["export"], eval_backbone=tiny_backbone("vit"))
    with pytest.raises(ExportError, match="open_clip"):
        run(output, digits_dir, demo_backbone, accelerator, ["export"], eval_backbone=tiny_backbone("open_clip"))


# ---------------------------------------------------------------------------------------------
# statistics/ and statistics-only distillation


def test_statistics_card(exported):
    output, _ = exported
    card = (output / "statistics" / "README.md").read_text()
    assert "features/" in card and "stays local" in card and "statistics_from:" in card
    assert "`class_means` [10, 64] float32" in card


def test_cards_name_the_library_versions_of_the_results(exported):
    output, _ = exported
    for card in ("synthetic/README.md", "model/README.md", "statistics/README.md"):
        text = (output / card).read_text()
        assert "Library versions recorded with this run's numbers: python 3.11.7, torch 2.14.1, transformers 5.99.0." \
            in text, card


def test_distill_from_a_statistics_folder_alone(statistics_run, demo_backbone, tmp_path, accelerator):
    published = tmp_path / "published"
    shutil.copytree(statistics_run / "statistics", published, ignore=shutil.ignore_patterns("features"))
    output = tmp_path / "run"
    config = tiny_config("", demo_backbone, output, iterations=10)
    config.statistics_from = str(published)
    config.stages = ["distill", "export"]
    config.validate()
    run_stages(config, accelerator)
    images = load_file(output / "synthetic" / "images.safetensors")["images"]
    assert images.shape == (10, 3, 16, 16)
    assert not (output / "statistics").exists()  # nothing of Stage I was needed or made
    assert (output / "model" / "model.safetensors").is_file()
    recorded = json.loads((published / "statistics.json").read_text())["dataset"]
    assert card_metadata(output / "synthetic" / "README.md")["sfm"]["source_dataset"] == Path(recorded).name
    # Not evaluated: the card names the versions Stage II recorded, this environment's.
    versions = json.loads((output / "synthetic" / "synthetic.json").read_text())["versions"]
    assert f"transformers {versions['transformers']}" in (output / "synthetic" / "README.md").read_text()


def test_statistics_from_resolution(tmp_path, monkeypatch, statistics_run):
    from sfm_hf.config import Config

    config = Config(output_dir=str(tmp_path), statistics_from=None)
    assert statistics_dir(config) == tmp_path / "statistics"
    config.statistics_from = str(tmp_path)
    with pytest.raises(UserError, match="no statistics.safetensors"):
        statistics_dir(config)
    config.statistics_from = "acme/never-downloaded-statistics"
    with pytest.raises(HubAccessError, match="acme/never-downloaded-statistics"):
        statistics_dir(config)  # offline and not cached
    import huggingface_hub

    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        return str(statistics_run / "statistics")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert statistics_dir(config) == statistics_run / "statistics"
    assert calls[0]["repo_id"] == "acme/never-downloaded-statistics" and calls[0]["repo_type"] == "model"
    assert not any("features" in pattern for pattern in calls[0]["allow_patterns"])


# ---------------------------------------------------------------------------------------------
# Publishing


class FakeHub:
    """A Hub in a local folder: each commit is applied to <root>/<repo type>/<repo id>; nothing leaves the machine."""

    def __init__(self, monkeypatch, root: Path, *, fail_commit=False):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

        self.root = root
        self.calls = []

        def create_repo(api, repo_id, repo_type=None, **kwargs):
            self.calls.append(("create_repo", repo_id, {"repo_type": repo_type, **kwargs}))
            self.repo(repo_id, repo_type).mkdir(parents=True, exist_ok=True)

        def create_branch(api, repo_id, branch, repo_type=None, **kwargs):
            self.calls.append(("create_branch", repo_id, {"branch": branch, "repo_type": repo_type, **kwargs}))

        def list_repo_files(api, repo_id, repo_type=None, revision=None, **kwargs):
            folder = self.repo(repo_id, repo_type)
            if not folder.is_dir():
                raise _http_error(RepositoryNotFoundError, 404)
            return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]

        def hf_hub_download(api, repo_id, filename, repo_type=None, revision=None, **kwargs):
            path = self.repo(repo_id, repo_type) / filename
            if not path.is_file():
                raise _http_error(RemoteEntryNotFoundError, 404)
            return str(path)

        def create_commit(api, repo_id, operations, repo_type=None, **kwargs):
            self.calls.append(("create_commit", repo_id, {"operations": operations, "repo_type": repo_type, **kwargs}))
            if fail_commit:
                raise _http_error(HfHubHTTPError, 503)
            folder = self.repo(repo_id, repo_type)
            for operation in operations:
                target = folder / operation.path_in_repo
                if isinstance(operation, CommitOperationDelete):
                    target.unlink()
                else:
                    assert isinstance(operation, CommitOperationAdd)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with operation.as_file() as source:
                        target.write_bytes(source.read())
            return types.SimpleNamespace(pr_url=f"https://huggingface.co/{repo_id}/discussions/1"
                                         if kwargs.get("create_pr") else None)

        from huggingface_hub.errors import HfHubHTTPError

        for name, function in (("create_repo", create_repo), ("create_branch", create_branch),
                               ("list_repo_files", list_repo_files), ("hf_hub_download", hf_hub_download),
                               ("create_commit", create_commit)):
            monkeypatch.setattr(HfApi, name, function)

    def repo(self, repo_id: str, repo_type: str | None) -> Path:
        return self.root / (repo_type or "model") / repo_id

    def of(self, kind):
        return [(repo_id, kwargs) for name, repo_id, kwargs in self.calls if name == kind]


def published_text(folder: Path) -> str:
    return "\n".join(path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file())


def test_push_makes_one_commit_per_repo_without_token_or_local_paths(exported, digits_dir, demo_backbone, tmp_path,
                                                                   accelerator, monkeypatch, capsys):
    import datasets
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    output = tmp_path / "run"
    shutil.copytree(exported[0], output)
    (output / "statistics" / "features").mkdir(exist_ok=True)
    (output / "statistics" / "features" / "train.bin").write_bytes(b"cache")
    run(output, digits_dir, demo_backbone, accelerator, ["export"], push=True, org="acme", private=True,
        dataset_name="digits10", backbone_name="tinyvit")
    created = hub.of("create_repo")
    assert [(repo_id, kwargs["repo_type"], kwargs["private"], kwargs["exist_ok"]) for repo_id, kwargs in created] == [
        ("acme/sfm-digits10-ipc1", "dataset", True, True),
        ("acme/sfm-digits10-tinyvit-ipc1", "model", True, True),
        ("acme/sfm-digits10-tinyvit-statistics", "model", True, True),
    ]
    assert [repo_id for repo_id, _ in hub.of("create_commit")] == [repo_id for repo_id, _ in created]
    config_name = "tinyvit"  # hub.backbone_name names the dataset config
    dataset_repo = hub.repo("acme/sfm-digits10-ipc1", "dataset")
    files = {path.relative_to(dataset_repo).as_posix() for path in dataset_repo.rglob("*") if path.is_file()}
    assert {f"data/{config_name}/{name}" for name in ("images.safetensors", "synthetic.json", "results.json",
                                                      "config.yaml", "preview.png")} <= files
    assert "images.safetensors" not in files and "synthetic.json" not in files  # Stage II's local working copies
    assert len(datasets.load_dataset(str(dataset_repo), config_name, split="train")) == 10
    statistics_repo = hub.repo("acme/sfm-digits10-tinyvit-statistics", "model")
    assert (statistics_repo / "statistics.safetensors").is_file() and not (statistics_repo / "features").exists()
    model_repo = hub.repo("acme/sfm-digits10-tinyvit-ipc1", "model")
    card = ModelCard.load(model_repo / "README.md")
    assert "acme/sfm-digits10-ipc1" in card.data.datasets and card.data.pipeline_tag == "image-classification"
    published = yaml.safe_load((model_repo / "config.yaml").read_text())
    assert published["ipc"] == 1 and published["hub"]["org"] == "acme"
    assert published["dataset"] == digits_dir.name and published["backbone"] == Path(demo_backbone).name
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err
    everything = published_text(hub.root)
    assert TOKEN not in everything
    for local in (str(digits_dir), demo_backbone, str(output), str(tmp_path)):
        assert local not in everything  # local paths are published by their folder names only
    for path in output.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_exported_cards_and_bundle_config_name_local_inputs_by_folder_name(exported, digits_dir, demo_backbone):
    from huggingface_hub import DatasetCard, ModelCard

    output, _ = exported
    for path in ("model/README.md", "model/config.json", "model/config.yaml", "synthetic/README.md",
                 "statistics/README.md", f"synthetic/data/{slug(demo_backbone)}/synthetic.json"):
        text = (output / path).read_text()
        assert str(digits_dir) not in text and demo_backbone not in text and str(output) not in text, path
    bundle = json.loads((output / "model" / "config.json").read_text())
    assert bundle["backbone_id"] == bundle["distill_backbone"] == Path(demo_backbone).name
    assert ModelCard.load(output / "model" / "README.md").data.model_name
    assert ModelCard.load(output / "statistics" / "README.md").data.tags[0] == "sfm"
    assert DatasetCard.load(output / "synthetic" / "README.md").data["sfm"]["source_dataset"] == digits_dir.name


def test_failed_upload_keeps_the_folders_and_says_what_to_rerun(exported, digits_dir, demo_backbone, tmp_path,
                                                               accelerator, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path / "hub", fail_commit=True)
    output = tmp_path / "run"
    shutil.copytree(exported[0], output)
    with pytest.raises(PublishError, match="--stages export --hub.push true") as error:
        run(output, digits_dir, demo_backbone, accelerator, ["export"], push=True, org="acme")
    assert "intact" in str(error.value) and "503" in str(error.value)
    assert len(hub.of("create_commit")) == 3  # every folder was tried
    for folder in ("synthetic", "model", "statistics"):
        assert (output / folder / "README.md").is_file()
    assert (output / "model" / "model.safetensors").is_file()


def test_two_runs_push_their_configs_into_one_dataset_repo(exported, distilled, digits_dir, demo_backbone, tmp_path,
                                                           accelerator, monkeypatch):
    import datasets
    from huggingface_hub import DatasetCard

    hub = FakeHub(monkeypatch, tmp_path / "hub")
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(exported[0], first)
    shutil.copytree(distilled, second)
    own, other = slug(demo_backbone), f"{slug(demo_backbone)}-seed7"
    run(first, digits_dir, demo_backbone, accelerator, ["export"], push=True, org="acme", folders=["dataset"],
        dataset_name="digits")
    repo = hub.repo("acme/sfm-digits-ipc1", "dataset")
    (repo / "data" / own / "stale.bin").write_bytes(b"from an older push")
    run(second, digits_dir, demo_backbone, accelerator, ["export"], push=True, org="acme", folders=["dataset"],
        dataset_name="digits",
        dataset_config_name="{backbone}-seed7", revision="experiments", create_pr=True)
    ((_, branch),) = hub.of("create_branch")
    assert branch["branch"] == "experiments"
    assert [kwargs["revision"] for _, kwargs in hub.of("create_commit")] == [None, "experiments"]
    assert hub.of("create_commit")[1][1]["create_pr"] is True
    for name in (own, other):
        loaded = datasets.load_dataset(str(repo), name, split="train")
        assert len(loaded) == 10 and loaded.features["label"].names == [str(d) for d in range(10)]
    assert len(datasets.load_dataset(str(repo), split="train")) == 10  # the first run's config stays the default
    metadata = DatasetCard.load(repo / "README.md").data
    configs = {entry["config_name"]: entry for entry in metadata["configs"]}
    assert set(configs) == {own, other} and configs[own].get("default") and not configs[other].get("default")
    assert {info["config_name"] for info in metadata["dataset_info"]} == {own, other}
    assert (repo / "data" / own / "stale.bin").is_file()  # another run's config is not this push's to clean
    local = card_metadata(second / "synthetic" / "README.md")  # still describes the local folder only
    assert [entry["config_name"] for entry in local["configs"]] == [other]

    run(first, digits_dir, demo_backbone, accelerator, ["export"], push=True, org="acme", folders=["dataset"],
        dataset_name="digits")
    assert not (repo / "data" / own / "stale.bin").exists()  # re-pushing a config replaces its folder
    assert (repo / "data" / other / "images.safetensors").is_file()
    assert {entry["config_name"] for entry in DatasetCard.load(repo / "README.md").data["configs"]} == {own, other}


def test_include_runs_makes_named_configs_in_one_folder(exported, distilled, digits_dir, demo_backbone, tmp_path,
                                                        accelerator):
    import datasets

    other = tmp_path / "other"
    shutil.copytree(distilled, other)
    run(other, digits_dir, demo_backbone, accelerator, ["export"], dataset_config_name="{backbone}-seed7",
        folders=["dataset"])
    output = tmp_path / "run"
    shutil.copytree(exported[0], output)
    run(output, digits_dir, demo_backbone, accelerator, ["export"], include_runs=[str(other)], folders=["dataset"])
    folder = str(output / "synthetic")
    own, included = slug(demo_backbone), f"{slug(demo_backbone)}-seed7"
    assert len(datasets.load_dataset(folder, split="train")) == 10  # the default config needs no name
    assert len(datasets.load_dataset(folder, included, split="train")) == 10
    metadata = card_metadata(output / "synthetic" / "README.md")
    assert [entry["config_name"] for entry in metadata["configs"]] == [own, included]
    with pytest.raises(ExportError, match="distinct names"):
        run(output, digits_dir, demo_backbone, accelerator, ["export"], include_runs=[str(output)],
            folders=["dataset"])


# ---------------------------------------------------------------------------------------------
# Configuration and fast failure


def test_hub_options_are_checked_before_any_work():
    from sfm_hf.config import Config, ConfigError

    config = Config(dataset="d", backbone="b")
    config.hub.push = True
    with pytest.raises(ConfigError, match="hub.org"):
        config.validate()
    config.hub.org = "acme"
    config.hub.model_repo = "{org}/sfm-{dataset}-{size}"
    with pytest.raises(ConfigError, match="size"):
        config.validate()
    config = Config(backbone="b", statistics_from="acme/stats", stages=["distill", "export"])
    config.validate()  # no dataset needed
    config.stages = ["statistics", "distill"]
    with pytest.raises(ConfigError, match="statistics_from"):
        config.validate()


def _http_error(kind, status):
    request = httpx2.Request("GET", "https://huggingface.co/api/x")
    return kind("error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("raised, message", [
    ("gated", "is gated: accept its conditions at https://huggingface.co/datasets/ILSVRC/imagenet-1k"),
    ("missing", "is not on the Hub"),
    ("offline", "HF_HUB_OFFLINE=1"),
])
def test_unreachable_hub_repos_fail_fast_with_the_reason(monkeypatch, tmp_path, raised, message):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from sfm_hf.config import Config

    errors = {
        "gated": _http_error(GatedRepoError, 403),
        "missing": _http_error(RepositoryNotFoundError, 404),
        "offline": httpx2.ConnectError("[Errno -2] Name or service not known"),
    }
    checked = []

    def auth_check(api, repo_id, repo_type=None, **kwargs):
        checked.append((repo_id, repo_type))
        if repo_id == "ILSVRC/imagenet-1k":
            raise errors[raised]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "auth_check", auth_check)
    config = Config(dataset="ILSVRC/imagenet-1k", backbone=str(tmp_path), stages=["statistics", "distill"])
    with pytest.raises(HubAccessError, match=message.replace(".", r"\.")):
        check_sources(config)
    assert checked == [("ILSVRC/imagenet-1k", "dataset")]  # the local backbone folder needs no check
    config.dataset = str(tmp_path)
    config.backbone = "facebook/dinov2-base"
    config.eval_backbones = ["openai/clip-vit-base-patch16"]
    config.stages = ["statistics", "distill", "evaluate", "export"]
    check_sources(config)
    assert checked[1:] == [("facebook/dinov2-base", "model"), ("openai/clip-vit-base-patch16", "model")]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(recipe):
    from sfm_hf.config import load_recipe

    config = load_recipe(recipe)
    config.validate()
    assert recipe.read_text().startswith("#")  # the header: which table it reproduces, what it costs


PIPELINE_SCORE = r'''
import json, sys
sys.modules["sfm_hf"] = None  # as on a machine where sfm-hf is not installed
import datasets
from transformers import pipeline

model_dir, dataset_dir, out = sys.argv[1:]
test = datasets.load_dataset(dataset_dir, split="test")
classify = pipeline("image-classification", model=model_dir, trust_remote_code=True)
names = test.features["label"].names
predicted = [result[0]["label"] for result in classify(list(test["image"]), top_k=1, batch_size=64)]
correct = sum(label == names[truth] for label, truth in zip(predicted, test["label"]))
Path = __import__("pathlib").Path
Path(out).write_text(json.dumps({"accuracy": correct / len(predicted), "images": len(predicted)}))
'''


def test_pipeline_scores_what_the_card_says(distilled, digits_dir, demo_backbone, tmp_path):
    """The exported bundle through pipeline(), without sfm_hf, scores the card's model-index accuracy on the eval split
    (the bundle's processor must reproduce Stage I/III's resize, crop and normalisation)."""
    from accelerate import Accelerator

    output = tmp_path / "run"
    shutil.copytree(distilled, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=20)  # the settings `distilled` was made with
    assert config.data.crop_ratio == 0.875  # the default: shorter side 32, not the backbone's own 28
    config.stages = ["evaluate", "export"]
    config.evaluate.train_sets, config.evaluate.modes = ["sfm"], ["ci"]
    config.evaluate.trials, config.evaluate.curve_points = 1, 0
    config.evaluate.iterations = config.evaluate.max_iterations = 100
    config.evaluate.full_dataset = False
    config.evaluate.projector_lr = 0.03
    run_stages(config, Accelerator(cpu=True))
    (result,) = card_metadata(output / "model" / "README.md")["model-index"][0]["results"]
    card_accuracy = result["metrics"][0]["value"]
    script = tmp_path / "score.py"
    script.write_text(PIPELINE_SCORE)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(output / "model"), str(digits_dir), str(tmp_path / "o.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads((tmp_path / "o.json").read_text())
    assert answer["images"] == 450
    assert answer["accuracy"] == pytest.approx(card_accuracy, abs=0.005)
