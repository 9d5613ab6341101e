"""Shared fixtures: tiny backbones of every family, small datasets, a finished tiny run.

The Hub is unreachable here; HF_HUB_OFFLINE must be set before anything imports
huggingface_hub, or every miss hangs in retries.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("ATEN_CPU_CAPABILITY"):
    # Inductor's cache does not key its generated kernels by this setting: a run under `default` after one under the
    # machine's own capability reused vectorised C++ and failed to compile it (CppCompileError: 'at::vec' has not been
    # declared). One cache per capability lets the suite run under each on one machine.
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))

import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)

FAMILIES = ("dinov2", "vit", "clip", "siglip", "timm_eva02", "open_clip")
# The feature each family documents (REFERENCE.md table), at tiny sizes.
FEATURE_DIMS = {"dinov2": 32, "vit": 32, "clip": 16, "siglip": 32, "timm_eva02": 32, "open_clip": 24}


def build_tiny_backbone(family: str, folder: Path) -> str:
    """A tiny (hidden 32, 2 layers) encoder of ``family`` saved like a Hub checkpoint; returns its load id."""
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    if family == "dinov2":
        tf.Dinov2Model(tf.Dinov2Config(**vision)).save_pretrained(folder)
    elif family == "vit":
        tf.ViTModel(tf.ViTConfig(**vision)).save_pretrained(folder)
    elif family == "clip":
        config = tf.CLIPConfig(
            text_config={**text, "projection_dim": 16}, vision_config={**vision, "projection_dim": 16}, projection_dim=16
        )
        tf.CLIPModel(config).save_pretrained(folder)
        tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    elif family == "siglip":
        tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    elif family == "timm_eva02":
        config = tf.TimmWrapperConfig(
            architecture="eva02_base_patch14_224", model_args=dict(img_size=28, embed_dim=32, depth=2, num_heads=2)
        )
        tf.TimmWrapperModel(config).save_pretrained(folder)
    elif family == "open_clip":
        import open_clip
        from safetensors.torch import save_file

        model_cfg = {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
        }
        model = open_clip.CLIP(**model_cfg)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
        return f"local-dir:{folder}"
    else:
        raise ValueError(family)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Factory: family name -> load id of a tiny saved backbone (built once per session)."""
    built: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in built:
            built[family] = build_tiny_backbone(family, tmp_path_factory.mktemp(f"backbone-{family}"))
        return built[family]

    return make


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from sfm_hf.demo import build_digits_dataset

    return build_digits_dataset(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def demo_backbone(tmp_path_factory) -> str:
    """The demo's committed pre-trained tiny ViT: the same weights on every machine, so the margins of the tests
    that train on its features hold on every machine too."""
    from sfm_hf.demo import copy_demo_backbone

    return str(copy_demo_backbone(tmp_path_factory.mktemp("tiny-vit")))


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def make_image_folder(tmp_path):
    """Factory: an image folder train/<class>/*.png + test/<class>/*.png with mixed modes, optional corrupt files."""

    def make(classes=("cat", "dog", "eel"), per_class=4, corrupt=0, modes=("RGB", "L", "RGBA", "P"), size=20):
        root = tmp_path / "folder"
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                directory = root / split / name
                directory.mkdir(parents=True, exist_ok=True)
                for k in range(per_class):
                    array = (rng.random((size, size + 4, 3)) * 60 + 60 * c).astype(np.uint8)
                    (directory / f"{k}.png").write_bytes(_png(array, modes[k % len(modes)]))
        for k in range(corrupt):
            (root / "train" / classes[0] / f"broken{k}.png").write_bytes(b"\x89PNG not really an image")
        return root

    return make


@pytest.fixture(autouse=True)
def restore_package_logging():
    """The command line points sfm_hf's logger at the stdout of the moment; a test's captured stdout is closed
    afterwards, so the next message would fail to print (and caplog would see nothing)."""
    package = logging.getLogger("sfm_hf")
    saved = package.handlers[:], package.level, package.propagate
    yield
    package.handlers[:], package.level, package.propagate = saved


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def tiny_config(dataset: Path | str, backbone: str, output_dir: Path, **distill):
    """A config for fast test runs on the digits data."""
    from sfm_hf.config import Config

    config = Config(dataset=str(dataset), backbone=backbone, output_dir=str(output_dir), seed=0)
    config.data.batch_size = 128
    config.distill.iterations = 40
    config.distill.syn_res = 16
    config.distill.pyramid_every = 10
    config.distill.checkpoint_every = 0
    config.distill.log_every = 10
    # The paper's start, which most Stage II tests are about; the default (auto) has its own tests.
    config.distill.init = "noise"
    for key, value in distill.items():
        setattr(config.distill, key, value)
    return config


@pytest.fixture(scope="session")
def statistics_run(tmp_path_factory, digits_dir, demo_backbone):
    """Stage I on the digits with the demo backbone, run once; later tests copy its output_dir."""
    from accelerate import Accelerator

    from sfm_hf.runner import run_stages

    output = tmp_path_factory.mktemp("run-statistics")
    config = tiny_config(digits_dir, demo_backbone, output)
    config.stages = ["statistics"]
    run_stages(config, Accelerator(cpu=True))
    return output


# Stage II settings of `distilled_run`: a later stage on a copy of it must be configured alike (the run refuses
# images made with other settings).
DISTILLED_RUN_SETTINGS = {"iterations": 120, "pyramid_every": 20, "lr": 0.02}


@pytest.fixture(scope="module")
def distilled_run(statistics_run, digits_dir, demo_backbone, tmp_path_factory):
    """Stages I and II on the digits (a short SFM run); tests copy it before writing into it."""
    from accelerate import Accelerator

    from sfm_hf.runner import run_stages

    output = tmp_path_factory.mktemp("evaluate") / "distilled"
    shutil.copytree(statistics_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, **DISTILLED_RUN_SETTINGS)
    config.stages = ["distill"]
    run_stages(config, Accelerator(cpu=True))
    return output


def launch_config(dataset: Path | str, backbone: str, output_dir: Path):
    """The tiny three-stage recipe the multi-process tests run both in one process and in several."""
    # The default start, so that the multi-process runs also check that every rank picks the same real images.
    config = tiny_config(dataset, backbone, output_dir, iterations=30, init="auto")
    config.stages = ["statistics", "distill", "evaluate"]
    config.evaluate.train_sets = ["sfm"]
    config.evaluate.modes = ["vanilla", "ci"]
    config.evaluate.trials = 2
    config.evaluate.iterations = 20
    config.evaluate.full_dataset = False
    config.evaluate.curve_points = 0
    return config


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, digits_dir, demo_backbone) -> Path:
    """``launch_config`` run once in this process: what every multi-process run must reproduce."""
    from accelerate import Accelerator

    from sfm_hf.runner import run_stages

    output = tmp_path_factory.mktemp("one-process")
    run_stages(launch_config(digits_dir, demo_backbone, output), Accelerator(cpu=True))
    return output
