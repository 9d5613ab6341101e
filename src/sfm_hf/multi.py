"""One synthetic set for several distillation backbones (``backbone: [A, B, ...]``).

Layout of such a run: every listed backbone gets a member folder
``<output_dir>/backbones/<slug>/`` laid out exactly like a single-backbone run (``statistics/``
with its golden classifier and feature cache; ``results.json``, ``results.md`` and
``evaluation/`` for the joint set evaluated there), so Stage I and Stage III run unchanged on a
member config. The joint set itself is ``<output_dir>/synthetic/`` (Stage II optimises it
against the mean of the members' SFM losses), and ``<output_dir>/results.json`` gathers the
members' records. Single-backbone runs never see any of this.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .config import Config
from .layout import RunLayout
from .names import short_name
from .utils import write_text_atomically


def is_joint(config: Config) -> bool:
    return isinstance(config.backbone, list)


def member_dir(config: Config, backbone: str) -> Path:
    return RunLayout(config.output_dir).member_dir(backbone)


def member_config(config: Config, backbone: str) -> Config:
    """The single-backbone config of one member: its own folder, its backbone, evaluated on it by default."""
    member = copy.deepcopy(config)
    member.backbone = backbone
    member.output_dir = str(member_dir(config, backbone))
    member.eval_backbones = list(config.eval_backbones) or [backbone]
    return member


def member_configs(config: Config) -> list[Config]:
    """The single-backbone configs a run's statistics belong to: every member's, or the run's own."""
    return [member_config(config, name) for name in config.backbones] if is_joint(config) else [config]


def run_folders(config: Config) -> list[Path]:
    """Every folder that holds outputs of this run: output_dir and, for a joint run, each member folder."""
    members = [member_dir(config, name) for name in config.backbones] if is_joint(config) else []
    return [Path(config.output_dir), *members]


def run_joint_statistics(config: Config, accelerator) -> list:
    """Stage I once per listed backbone, each into its member folder."""
    from .statistics import run_statistics

    return [run_statistics(member, accelerator) for member in member_configs(config)]


def run_joint_evaluate(config: Config, accelerator) -> list[dict[str, Any]]:
    """Stage III of the joint set on every member (its golden classifier, baselines and eval backbones).

    Writes each member's outputs into its folder and all records, tagged with the joint backbones,
    into ``<output_dir>/results.json`` and ``results.md``.
    """
    from .evaluation import run_evaluate
    from .report import write_markdown

    records = []
    for name in config.backbones:
        member_records = run_evaluate(member_config(config, name), accelerator, synthetic_root=Path(config.output_dir))
        records.extend({**record, "joint_backbones": config.backbones} for record in member_records)
    if accelerator.is_main_process:
        layout = RunLayout(config.output_dir)
        write_text_atomically(layout.results_file, json.dumps(records, indent=2))
        write_markdown(records, layout.results_markdown, title=f"Results: {short_name(config.dataset)}, ipc {config.ipc}, "
                       f"joint set of {len(config.backbones)} backbones")
    accelerator.wait_for_everyone()
    return records
