"""One synthetic set for several distillation backbones (``backbone: [A, B, ...]``).

Layout of such a run: every listed backbone gets a member folder
``<output_dir>/backbones/<slug>/`` laid out exactly like a single-backbone run (``statistics/``
with its golden classifier and feature cache; ``results.json``, ``results.md`` and
``evaluation/`` for the joint set evaluated there), so Stage I and Stage III run unchanged on a
member config. The joint set itself is ``<output_dir>/synthetic/`` (Stage II optimises it
against the mean of the members' SFM losses), and ``<output_dir>/results.json`` gathers the
members' records. :mod:`sfm_hf.runner` calls Stage I and III here instead of directly for such a
run, so those stages never see a list of backbones (a member's config is ``Config.member``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config
from .evaluation import run_evaluate
from .layout import RunLayout
from .names import short_name
from .report import write_markdown
from .statistics import run_statistics
from .utils import write_text_atomically


def run_joint_statistics(config: Config, accelerator) -> list:
    """Stage I once per listed backbone, each into its member folder."""
    return [run_statistics(member, accelerator) for member in config.members()]


def run_joint_evaluate(config: Config, accelerator) -> list[dict[str, Any]]:
    """Stage III of the joint set on every member (its golden classifier, baselines and eval backbones).

    Writes each member's outputs into its folder and all records, tagged with the joint backbones,
    into ``<output_dir>/results.json`` and ``results.md``.
    """
    records = []
    for name in config.backbones:
        member_records = run_evaluate(config.member(name), accelerator, synthetic_root=Path(config.output_dir))
        records.extend({**record, "joint_backbones": config.backbones} for record in member_records)
    if accelerator.is_main_process:
        layout = RunLayout(config.output_dir)
        write_text_atomically(layout.results_file, json.dumps(records, indent=2))
        write_markdown(records, layout.results_markdown, title=f"Results: {short_name(config.dataset)}, ipc {config.ipc}, "
                       f"joint set of {len(config.backbones)} backbones")
    accelerator.wait_for_everyone()
    return records
