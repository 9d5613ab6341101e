"""What an export knows before writing: Hub repo names, the earlier stages' files, how local paths are hidden."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import StageInputError, UserError
from ..hub import statistics_dir
from ..layout import GOLDEN_JSON, IMAGES_FILE, STATISTICS_JSON, SYNTHETIC_JSON, RunLayout
from ..names import is_hub_id, slug


class ExportError(UserError):
    """Something the export needs is missing or inconsistent; the message says what to run or change."""


class PublishError(UserError):
    """An upload failed; the local folders are intact and the message says what to re-run."""



@dataclass
class RepoNames:
    """Hub repo ids (and the dataset config name) this run exports to."""

    dataset: str
    dataset_config: str
    model: str
    statistics: str


def repo_names(config: Config, source_dataset: str) -> RepoNames:
    """Fill the ``hub.*`` templates; without ``hub.org`` the ids carry a 'your-org' placeholder (local export only)."""
    hub = config.hub
    values = {
        "org": hub.org or "your-org",
        "dataset": hub.dataset_name or slug(source_dataset),
        # A joint set (several backbones) is its own dataset config, `multi` unless hub.backbone_name says otherwise.
        "backbone": hub.backbone_name or ("multi" if config.is_joint else slug(config.backbone)),
        "eval_backbone": slug(bundle_backbone(config)),
        "ipc": config.ipc,
        "method": config.distill.method,
    }
    names = RepoNames(
        dataset=hub.dataset_repo.format(**values),
        dataset_config=hub.dataset_config_name.format(**values),
        model=hub.model_repo.format(**values),
        statistics=hub.statistics_repo.format(**values),
    )
    from huggingface_hub.utils import validate_repo_id

    for key in ("dataset", "model", "statistics"):
        repo_id = getattr(names, key)
        try:
            validate_repo_id(repo_id)
        except ValueError as error:
            raise ExportError(f"`hub.{key}_repo` gives {repo_id!r}, which is not a valid Hub repo id: {error}") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", names.dataset_config):
        raise ExportError(
            f"`hub.dataset_config_name` gives {names.dataset_config!r}: use letters, digits, '.', '_' and '-'."
        )
    return names


def bundle_backbone(config: Config) -> str:
    """The evaluation backbone held by the model bundle."""
    return config.hub.eval_backbone or config.evaluation_backbones[0]


def _as_list(value: Any) -> list[str]:
    return list(value) if isinstance(value, list) else [value or ""]


def named_sources(values: dict[str, Any]) -> list[str]:
    """Every input and output a config (as ``Config.to_dict`` gives it) names by path or id."""
    hub, evaluate = values.get("hub") or {}, values.get("evaluate") or {}
    return [
        *_as_list(values.get("dataset")), *_as_list(values.get("backbone")), *(values.get("eval_backbones") or []),
        *_as_list(hub.get("eval_backbone")), *_as_list(values.get("statistics_from")), *_as_list(values.get("output_dir")),
        *(evaluate.get("extra_synthetic") or []), *(hub.get("include_runs") or []),
    ]


class PathRedactor:
    """Replaces the run's local input and output paths by their public names in text that will be published."""

    def __init__(self, *configs: dict[str, Any], extra: tuple[str, ...] = ()):
        """``configs``: this run's config and the one that made its images (``Config.to_dict`` form); ``extra``:
        further names."""
        names = [name for values in configs for name in named_sources(values)] + list(extra)
        replacements = {}
        for name in names:
            local = name.removeprefix("local-dir:")
            if not local or local.startswith("hf-hub:") or is_hub_id(local):
                continue
            for spelling in {local, local.rstrip("/"), str(Path(local).expanduser().resolve())}:
                if Path(spelling).name and Path(spelling).name != spelling:
                    replacements[spelling] = Path(spelling).name
        # Longest first: a folder inside another must not be cut at its parent's name.
        self.replacements = sorted(replacements.items(), key=lambda item: -len(item[0]))

    def __call__(self, text: str) -> str:
        for local, public in self.replacements:
            text = text.replace(local, public)
        return text


def public_config_yaml(recipe: dict[str, Any], redact: PathRedactor) -> str:
    """The config that made the run's images (:attr:`RunFacts.recipe`) as published beside every repo: enough to
    reproduce it from the Hub.

    The config holds no credentials (the token lives with huggingface_hub); local paths become base names.
    """
    import yaml

    header = "# The sfm-hf config that made this repo (local paths shortened to their folder names).\n"
    return header + redact(yaml.safe_dump(recipe, sort_keys=False))


@dataclass
class RunFacts:
    """Everything the export reads from the earlier stages' files."""

    config: Config
    output_dir: Path
    statistics_dir: Path
    statistics: dict[str, Any]
    golden: dict[str, Any] | None
    synthetic: dict[str, Any]
    results: list[dict[str, Any]]
    redact: PathRedactor

    @property
    def source_dataset(self) -> str:
        return self.config.dataset or self.statistics.get("dataset") or ""

    @property
    def recipe(self) -> dict[str, Any]:
        """The config that made the synthetic images, as Stage II recorded it in synthetic.json (settings resolved),
        never this export's command line; images made before Stage II recorded it: this run's config, which the
        runner checked against the settings the images were made with. The `hub` section is this export's: where
        and how the set is published does not shape the images."""
        current = self.config.to_dict()
        return {**(self.synthetic.get("config") or current), "hub": current["hub"]}

    @property
    def class_names(self) -> list[str]:
        return list(self.statistics["class_names"])

    @property
    def versions(self) -> dict[str, str | None]:
        """The library versions recorded with the run's numbers: Stage III's (results.json), else Stage II's
        (synthetic.json); empty for outputs made before versions were recorded."""
        recorded = (record["versions"] for record in self.results if record.get("versions"))
        return next(recorded, None) or self.synthetic.get("versions") or {}

    def variant_results(self) -> list[dict[str, Any]]:
        """Stage III rows about this run's synthetic set or its real baselines at this ipc."""
        return [
            record for record in self.results
            if record.get("distill_backbone") in self.config.backbones and record.get("ipc") in (None, self.config.ipc)
        ]


def read_results(output_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(output_dir).results_file
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ExportError(f"{path} should hold a JSON list of result records, got {type(records).__name__}.")
    return records


def gather_facts(config: Config) -> RunFacts:
    output_dir = Path(config.output_dir)
    synthetic_dir = RunLayout(output_dir).synthetic_dir
    synthetic_json = synthetic_dir / SYNTHETIC_JSON
    if not synthetic_json.is_file() or not (synthetic_dir / IMAGES_FILE).is_file():
        raise StageInputError(
            f"Stage 'export' needs {synthetic_dir}/{IMAGES_FILE} and {SYNTHETIC_JSON}: run the "
            "'distill' stage first (add it to --stages)."
        )
    # A joint set's members share the classes; the first member's statistics describe the dataset.
    stats_dir = statistics_dir(config.members()[0])
    if not (stats_dir / STATISTICS_JSON).is_file():
        raise StageInputError(f"Stage 'export' needs {stats_dir}/{STATISTICS_JSON}: run the 'statistics' stage first.")
    golden_json = stats_dir / GOLDEN_JSON
    statistics = json.loads((stats_dir / STATISTICS_JSON).read_text())
    synthetic = json.loads(synthetic_json.read_text())
    return RunFacts(
        config=config,
        output_dir=output_dir,
        statistics_dir=stats_dir,
        statistics=statistics,
        golden=json.loads(golden_json.read_text()) if golden_json.is_file() else None,
        synthetic=synthetic,
        results=read_results(output_dir),
        redact=PathRedactor(config.to_dict(), synthetic.get("config") or {}, extra=(statistics.get("dataset") or "",)),
    )


def source_license(dataset: str) -> str | None:
    """The license field of the source dataset's card, when a local or cached card says it."""
    from huggingface_hub import DatasetCard

    if not dataset:
        return None
    card_path = Path(dataset) / "README.md"
    if not card_path.is_file():
        if not is_hub_id(dataset):
            return None
        try:
            from huggingface_hub import hf_hub_download

            card_path = Path(hf_hub_download(dataset, "README.md", repo_type="dataset"))
        except Exception:  # noqa: BLE001 -- no card (offline, none published) just means no license field
            return None
    try:
        license_value = DatasetCard.load(card_path).data.get("license")
    except Exception:  # noqa: BLE001 -- an unreadable card is treated like a missing one
        return None
    return license_value if isinstance(license_value, str) else None

