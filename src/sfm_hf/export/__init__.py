"""The export stage: three Hub-layout folders in ``<output_dir>``, and publishing them (``hub.push``).

``synthetic/`` -- the dataset repo. Stage II's own files stay at its root for the local stages
(``images.safetensors``, ``synthetic.json``, ``preview.png``; not uploaded). Export adds one
folder per named config, ``data/<config>/``: ``train-00000-of-00001.parquet`` (``image``: PNG
bytes of the 8-bit quantised images, lossless; ``label``: ClassLabel with the real class
names), the exact float images (``images.safetensors``), ``synthetic.json``, ``results.json``
(this variant's Stage III rows), ``preview.png`` and ``config.yaml`` (the run's config); and the
card ``README.md``, whose YAML lists every config (this run's is the default). Per-config folders
let runs with other backbones or ipc push into one repo without overwriting each other.

``model/`` -- :class:`~sfm_hf.modeling_sfm.SFMForImageClassification` saved with its remote
code, the evaluation backbone's image processor, ``config.yaml`` and a card with model-index results.

``statistics/`` -- Stage I's folder gains a card and ``config.yaml``; its feature cache
(``features/``) is never uploaded.

Publishing makes one commit per repo. Local paths never leave the machine: published text names a
local input by its folder name (:class:`~sfm_hf.export.facts.PathRedactor`), a Hub input by its id.

Modules: ``facts`` (repo names, the earlier stages' files, path redaction), ``cards`` (template
rendering), one per folder (``dataset_folder``, ``model_folder``, ``statistics_folder``) and ``publish``;
this one runs the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate.logging import get_logger

from ..config import Config
from ..layout import STATISTICS_TENSORS
from .cards import human_size
from .dataset_folder import export_dataset
from .facts import RepoNames, gather_facts, repo_names, source_license
from .model_folder import export_model
from .publish import STATISTICS_LOCAL_ONLY, SYNTHETIC_LOCAL_ONLY, folder_bytes, publish
from .statistics_folder import export_statistics

logger = get_logger(__name__)


@dataclass
class Exported:
    """Where the export put things."""

    names: RepoNames
    folders: dict[str, Path | None]
    urls: list[str]


def snippets(folders: dict[str, Path | None]) -> dict[str, list[str]]:
    """Two lines that load each exported folder (the same lines work with the Hub repo id)."""
    lines = {}
    if folders.get("dataset"):
        lines["dataset"] = [
            "from datasets import load_dataset",
            f"synthetic = load_dataset({str(folders['dataset'])!r}, split='train')",
        ]
    if folders.get("model"):
        lines["model"] = [
            "from transformers import pipeline",
            f"classify = pipeline('image-classification', model={str(folders['model'])!r}, trust_remote_code=True)",
        ]
    if folders.get("statistics"):
        lines["statistics"] = [
            "from safetensors.torch import load_file",
            f"statistics = load_file({str(folders['statistics'] / STATISTICS_TENSORS)!r})",
        ]
    return lines


def run_export(config: Config, accelerator) -> Exported | None:
    """The export stage (main process only; the others wait). Returns what it wrote on the main process."""
    exported = None
    if accelerator.is_main_process:
        exported = export_run(config)
        logger.info(summary(exported))
    accelerator.wait_for_everyone()
    return exported


def export_run(config: Config) -> Exported:
    facts = gather_facts(config)
    names = repo_names(config, facts.source_dataset)
    license_name = config.hub.license or source_license(facts.source_dataset)
    wanted = set(config.hub.folders)
    folders: dict[str, Path | None] = {"dataset": export_dataset(facts, names, license_name)}
    folders["model"] = export_model(facts, names, license_name, folders["dataset"]) if "model" in wanted else None
    folders["statistics"] = export_statistics(facts, names, license_name) if "statistics" in wanted else None
    urls = publish(config, names, facts, folders, license_name) if config.hub.push else []
    return Exported(names=names, folders=folders, urls=urls)



def summary(exported: Exported) -> str:
    ignores = {"dataset": SYNTHETIC_LOCAL_ONLY, "model": [], "statistics": STATISTICS_LOCAL_ONLY}
    repos = {"dataset": exported.names.dataset, "model": exported.names.model, "statistics": exported.names.statistics}
    lines = ["Export: Hub-layout folders (bytes that an upload sends; local-only files excluded)"]
    code = snippets(exported.folders)
    for what in ("dataset", "model", "statistics"):
        folder = exported.folders.get(what)
        if folder is None:
            continue
        size = folder_bytes(folder, ignores[what])
        lines.append(f"  {what:<10} {folder}  ({human_size(size)}; repo {repos[what]})")
        lines.extend(f"      {line}" for line in code[what])
    if exported.urls:
        lines.append("Pushed: " + ", ".join(exported.urls))
    return "\n".join(lines)

