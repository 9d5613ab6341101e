"""The offline demo: real handwritten digits shipped with scikit-learn and a tiny pre-trained ViT.

Both are written to local folders and then read back through the same public paths a Hub
dataset id and a Hub model id take (``datasets.load_dataset`` and ``AutoModel``), so the
demo exercises the real loading code with no network.

The tiny ViT ships with the package (``assets/tiny-vit``, made by ``tools/demo_backbone.py``): pre-trained on each
machine, its hundreds of Adam steps grew another CPU's last-bit kernel differences (vector instruction set, BLAS
code path) into other weights and moved the demo's golden classifier by 4 pt between machines.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import shutil
import textwrap
import tokenize
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import Config

DIGITS_IMAGE_SIZE = 32
DEMO_BACKBONE_SIZE = 28
ASSET_VERSION = 3

# The committed demo backbone and what it was made from: its manifest records these settings, the fingerprint of the
# code that pre-trains it and each file's sha256, and tests/test_demo.py fails when either side moves alone.
DEMO_BACKBONE = Path(__file__).parent / "assets" / "tiny-vit"
MANIFEST = "manifest.json"
DEMO_BACKBONE_SETTINGS = {"seed": 0, "hidden_size": 64, "image_size": DEMO_BACKBONE_SIZE, "pretrain_steps": 500}
# The regeneration pre-trains on the baseline x86-64 code paths (ATen's scalar kernels, MKL's SSE2 branch without
# approximate reciprocals, oneDNN up to SSE4.1, one thread), so that regenerating the same recipe on another x86-64
# machine with the locked torch gives the same bytes instead of a diff; about 6x slower than the machine's own kernels.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
                  "OMP_NUM_THREADS": "1"}
REGENERATE = "regenerate it with `make demo-backbone` (tools/demo_backbone.py) and commit the folder"


def build_digits_dataset(folder: Path, image_size: int = DIGITS_IMAGE_SIZE, test_fraction: float = 0.25) -> Path:
    """scikit-learn's 1,797 8x8 digits as a Hub-layout parquet dataset (Image + ClassLabel), fixed split."""
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    train_rows, test_rows = train_test_split(
        np.arange(len(pixels)), test_size=test_fraction, stratify=digits.target, random_state=0
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        images = [
            Image.fromarray(pixels[row], mode="L").resize((image_size, image_size), Image.BILINEAR) for row in rows
        ]
        split_dataset = datasets.Dataset.from_dict(
            {"image": images, "label": digits.target[rows].tolist()}, features=features
        )
        split_dataset.to_parquet(str(data_dir / f"{split}-00000-of-00001.parquet"))
    return folder


def split_train_split(dataset_dir: Path, parts: int, folder: Path) -> list[Path]:
    """Cut the train split of a parquet dataset written by :func:`build_digits_dataset` into ``parts`` disjoint
    consecutive slices, each a dataset folder with the whole test split: the shards of the merge check."""
    import shutil

    import pyarrow.parquet as pq

    # pyarrow keeps the schema metadata where datasets stores the ClassLabel names.
    train = pq.read_table(sorted((dataset_dir / "data").glob("train-*.parquet")))
    shards = []
    for part in range(parts):
        start, stop = train.num_rows * part // parts, train.num_rows * (part + 1) // parts
        shard = folder / f"part{part}-of-{parts}"
        (shard / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(train.slice(start, stop - start), shard / "data" / "train-00000-of-00001.parquet")
        for test_file in (dataset_dir / "data").glob("test-*.parquet"):
            shutil.copy(test_file, shard / "data")
        shards.append(shard)
    return shards


def glyph_images(num_classes: int = 40, per_class: int = 150, size: int = DEMO_BACKBONE_SIZE, seed: int = 0):
    """Procedural "other data" for pre-training: each class is a random set of 2-4 pen strokes,
    drawn with random rotation, scale, shift and width, then blurred through 8x8 like the digits."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    templates = [rng.uniform(0.2, 0.8, size=(rng.integers(2, 5), 2, 2)) for _ in range(num_classes)]
    images = np.zeros((num_classes * per_class, size, size), np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    for row, label in enumerate(labels):
        angle, scale, shift = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.15), rng.uniform(-0.08, 0.08, 2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
        canvas = Image.new("L", (size, size))
        draw = ImageDraw.Draw(canvas)
        width = int(rng.integers(3, 6))
        for start, end in templates[label]:
            points = [tuple(((p - 0.5) @ rotation.T + 0.5 + shift) * size) for p in (start, end)]
            draw.line(points, fill=255, width=width)
        images[row] = np.asarray(canvas.resize((8, 8), Image.BILINEAR).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(images), torch.from_numpy(labels)


def pretrain_on_glyphs(model, *, steps: int = 500, seed: int = 0) -> None:
    """A few seconds of supervised training on glyphs (never on digits), so that the frozen tiny
    encoder has features that mean something, as a real self-supervised backbone would."""
    import torch.nn.functional as F

    from .modeling_sfm import IMAGENET_MEAN, IMAGENET_STD

    images, labels = glyph_images(seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, int(labels.max()) + 1)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-3)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (128,), generator=generator)
        pixels = (images[batch].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
        loss = F.cross_entropy(head(model(pixel_values=pixels).pooler_output), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_vit(folder: Path, *, seed: int = 0, hidden_size: int = 64, image_size: int = DEMO_BACKBONE_SIZE,
                   pretrain_steps: int = 500) -> Path:
    """A 2-layer DINOv2-family encoder from a config with a fixed seed, pre-trained for a few seconds
    on procedural glyphs, saved like a Hub checkpoint. The demo and the tests use the committed one
    (:data:`DEMO_BACKBONE`); the benchmarks build a second one with other settings."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from .modeling_sfm import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        image_size=image_size,
        patch_size=7,
    )
    model = Dinov2Model(config)
    if pretrain_steps:
        # Hundreds of Adam steps amplify the last-bit differences between thread counts (a CPU op splits its sums
        # by thread) into other weights, and with them another golden accuracy and other Stage III orderings:
        # one thread makes the backbone the same on any core count (the kernels' instruction set still moves it,
        # hence the committed demo backbone).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pretrain_on_glyphs(model, steps=pretrain_steps, seed=seed)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)
    return folder


def demo_backbone_recipe() -> dict:
    """What the committed demo backbone is a function of: its settings, the kernels it was pre-trained on, the
    normalization, and a fingerprint of the code that builds and pre-trains it (comments and docstrings excluded)."""
    from .modeling_sfm import IMAGENET_MEAN, IMAGENET_STD

    code = hashlib.sha256()
    for function in (glyph_images, pretrain_on_glyphs, build_tiny_vit):
        code.update(_code_tokens(textwrap.dedent(inspect.getsource(function))).encode())
    return {**DEMO_BACKBONE_SETTINGS, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
            "kernels": PINNED_KERNELS, "code_sha256": code.hexdigest()}


def _code_tokens(source: str) -> str:
    """A function's code without its docstring, comments and layout: the tokens' text run together (the same on
    every Python version, unlike an AST dump, whose fields change between releases)."""
    docstring = ast.parse(source).body[0].body[0]
    lines = range(docstring.lineno, docstring.end_lineno + 1) if (
        isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)) else range(0)
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    return "".join(token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
                   if token.type not in layout and token.start[0] not in lines)


def write_demo_backbone(folder: Path) -> None:
    """Pre-train the demo backbone into ``folder`` (replaced whole, only once complete) with its manifest. Run it in
    a process started under :data:`PINNED_KERNELS` (the libraries read them once, at their first call)."""
    import os
    import platform

    from .utils import file_digest, library_versions

    building = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    build_tiny_vit(building, **DEMO_BACKBONE_SETTINGS)
    files = {path.name: file_digest(path) for path in sorted(building.iterdir())}
    manifest = {"recipe": demo_backbone_recipe(), "files": files,
                "made_with": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                              "kernels": {name: os.environ.get(name) for name in PINNED_KERNELS},
                              "versions": library_versions()}}
    (building / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)


def demo_backbone_problems(folder: Path = DEMO_BACKBONE) -> list[str]:
    """Why ``folder`` is not what the demo backbone's regeneration last wrote for today's recipe (empty: it is)."""
    from .utils import file_digest

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: {REGENERATE}"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    if manifest["recipe"] != demo_backbone_recipe():
        problems.append(f"the recipe in {manifest_path} is not today's (demo.py's settings or pre-training code "
                        f"changed): {REGENERATE}")
    present = {path.name for path in folder.iterdir()} - {MANIFEST}
    for name in sorted(present | set(manifest["files"])):
        if name not in present or name not in manifest["files"]:
            problems.append(f"{folder / name} is {'missing' if name not in present else 'not in the manifest'}: "
                            f"{REGENERATE}")
        elif file_digest(folder / name) != manifest["files"][name]:
            problems.append(f"{folder / name} changed since its regeneration: {REGENERATE}")
    return problems


def copy_demo_backbone(folder: Path) -> Path:
    """The committed demo backbone copied to ``folder`` (a local checkpoint like any other)."""
    shutil.copytree(DEMO_BACKBONE, folder, dirs_exist_ok=True)
    return folder


def prepare_demo_assets(root: Path) -> tuple[Path, Path]:
    """Build (once) the digits dataset and copy the committed tiny backbone under ``root``; returns their folders.
    A regenerated backbone replaces the copy on the next run."""
    dataset_dir, backbone_dir = root / "digits", root / "tiny-vit"
    stamp = root / "assets.json"
    wanted = {"version": ASSET_VERSION, "backbone": json.loads((DEMO_BACKBONE / MANIFEST).read_text())["files"]}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        build_digits_dataset(dataset_dir)
        shutil.rmtree(backbone_dir, ignore_errors=True)
        copy_demo_backbone(backbone_dir)
        stamp.write_text(json.dumps(wanted))
    return dataset_dir, backbone_dir


def demo_config(root: str | Path = "outputs/demo-assets", output_dir: str = "outputs/demo") -> Config:
    """The embedded default recipe: digits + tiny ViT, every stage, sized to run in about three minutes or less on
    2 CPU cores."""
    dataset_dir, backbone_dir = prepare_demo_assets(Path(root))
    config = Config(dataset=str(dataset_dir), backbone=str(backbone_dir), output_dir=output_dir, ipc=1, seed=0)
    # A 10-class, 64-d problem converges faster than ImageNet with ViT-B: fewer steps, a higher lr.
    config.distill.iterations = 1500
    config.distill.lr = 0.01
    config.distill.pyramid_every = 150
    config.distill.checkpoint_every = 500
    # Export ends the demo by printing the three Hub-layout folders and two lines that load each.
    config.stages = ["statistics", "distill", "evaluate", "export"]
    # Stage III, Table 2 style. Fewer trials than the paper's 5 keep the demo short (the evaluate stage says so);
    # 10 images of 64-d features get there in fewer steps at higher learning rates. Every training still runs
    # until doubling its length no longer helps on a slice of the real train split (protocol converge).
    config.evaluate.trials = 3
    config.evaluate.iterations = 150
    config.evaluate.max_iterations = 2400
    config.evaluate.lr = 0.02
    config.evaluate.projector_lr = 0.03
    return config
