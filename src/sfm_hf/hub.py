"""What a run takes from the Hugging Face Hub before it starts: a reachability check of every repo it
names, and the statistics of an earlier Stage I (``statistics_from``).

Loaders retry an unreachable Hub for half a minute per file and then say only "couldn't
connect"; one authenticated check per repo up front fails in a second and says why
(missing, gated, no network). Publishing lives in :mod:`sfm_hf.export`.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .errors import StageInputError, UserError
from .layout import CARD_FILE, STATISTICS_OUTPUTS, STATISTICS_TENSORS, RunLayout

STATISTICS_FILES = (*STATISTICS_OUTPUTS, CARD_FILE)


class HubAccessError(UserError):
    """A Hub repo a recipe names is missing, gated, private or unreachable."""


def _hub_id(name: str) -> str | None:
    """The Hub repo id behind a dataset/backbone/statistics name, or None for a local source."""
    if name.startswith("local-dir:") or Path(name).exists():
        return None
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    return name


def _repo_url(repo_id: str, repo_type: str) -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"https://huggingface.co/{prefix}{repo_id}"


def hub_sources(config: Config) -> list[tuple[str, str, str]]:
    """(what, repo id, repo type) of every Hub repo the configured stages will read."""
    stages = set(config.stages)
    sources = []
    if config.dataset and config.reads_real_data:
        sources.append(("dataset", config.dataset, "dataset"))
    if {"statistics", "distill", "evaluate"} & stages:
        sources.extend(("backbone", name, "model") for name in config.backbones)
    if {"evaluate", "export"} & stages:
        eval_names = config.evaluation_backbones if "evaluate" in stages else []
        if "export" in stages and "model" in config.hub.folders:
            eval_names = [*eval_names, config.hub.eval_backbone or config.evaluation_backbones[0]]
        sources.extend(("evaluation backbone", name, "model") for name in dict.fromkeys(eval_names))
    if config.statistics_from and {"distill", "export"} & stages:
        sources.extend(("statistics repo", name, "model") for name in statistics_sources(config))
    resolved = []
    for what, name, repo_type in sources:
        repo_id = _hub_id(name)
        if repo_id is not None:
            resolved.append((what, repo_id, repo_type))
    return list(dict.fromkeys(resolved))


def check_sources(config: Config) -> None:
    """Raise :class:`HubAccessError` at once when a Hub repo the stages need cannot be read.

    Skipped in offline mode (HF_HUB_OFFLINE=1), where the loaders read the local cache and fail
    fast by themselves.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    if constants.HF_HUB_OFFLINE:
        return
    api = HfApi()
    for what, repo_id, repo_type in hub_sources(config):
        try:
            validate_repo_id(repo_id)
        except ValueError:
            raise HubAccessError(
                f"The {what} {repo_id!r} is neither an existing local folder nor a valid Hub repo id."
            ) from None
        url = _repo_url(repo_id, repo_type)
        try:
            api.auth_check(repo_id, repo_type=repo_type)
        except GatedRepoError:
            raise HubAccessError(
                f"The {what} {repo_id!r} is gated: accept its conditions at {url} and log in "
                "(`hf auth login` or the HF_TOKEN environment variable)."
            ) from None
        except RepositoryNotFoundError:
            raise HubAccessError(
                f"The {what} {repo_id!r} is not on the Hub ({url}): misspelt, or private and this login has no "
                "access."
            ) from None
        except HfHubHTTPError as error:
            raise HubAccessError(f"The Hub refused access to the {what} {repo_id!r}: {error}") from None
        except HTTPError as error:
            raise HubAccessError(
                f"Cannot reach the Hub to check the {what} {repo_id!r} ({error.__class__.__name__}: {error}). "
                "No network? If everything the recipe needs is already in your local cache, run with "
                "HF_HUB_OFFLINE=1."
            ) from None


def statistics_sources(config: Config) -> list[str]:
    """The entries of ``statistics_from``: one source, or the shards a list names."""
    source = config.statistics_from
    if not source:
        return []
    return list(source) if isinstance(source, list) else [source]


def statistics_dir(config: Config) -> Path:
    """The folder holding this run's Stage I outputs: <output_dir>/statistics, or ``statistics_from``.

    A Hub id is downloaded (statistics and golden classifier only, never a feature cache) into the
    huggingface_hub cache. A list is read from <output_dir>/statistics, where the runner merges it
    first (:func:`sfm_hf.merge.merge_for_run`).
    """
    if not config.statistics_from or isinstance(config.statistics_from, list):
        return RunLayout(config.output_dir).statistics_dir
    return statistics_source(config.statistics_from)


def statistics_source(source: str) -> Path:
    """The local folder of one ``statistics_from`` entry (downloading a Hub id)."""
    if Path(source).is_dir():
        if not (Path(source) / STATISTICS_TENSORS).is_file():
            present = sorted(path.name for path in Path(source).iterdir())
            raise StageInputError(
                f"`statistics_from` folder {source!r} has no statistics.safetensors (it holds {present[:10]}); "
                "point it at a Stage I `statistics/` folder."
            )
        return Path(source)
    if Path(source).exists():
        raise StageInputError(f"`statistics_from` {source!r} is a file; give a statistics folder or a Hub repo id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=source, repo_type="model", allow_patterns=list(STATISTICS_FILES)))
    except (LocalEntryNotFoundError, HfHubHTTPError, HTTPError, ValueError) as error:
        raise HubAccessError(
            f"Cannot fetch the statistics repo {source!r} (not a local folder; from the Hub: "
            f"{error.__class__.__name__}: {error}). Offline without a cached copy, private, or misspelt?"
        ) from None
    if not (folder / STATISTICS_TENSORS).is_file():
        raise StageInputError(f"The Hub repo {source!r} holds no statistics.safetensors: it is not a statistics repo.")
    return folder
