"""Publishing: one Hub commit per exported folder (additions, stale files deleted), and what an upload sends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..layout import CARD_FILE, FEATURES_DIR, IMAGES_FILE, PREVIEW_FILE, SYNTHETIC_JSON, VARIANTS_DIR
from ..snapshots import SNAPSHOTS_DIR
from .dataset_folder import dataset_card, read_variant
from .facts import PathRedactor, PublishError, RepoNames, RunFacts

# Stage II's working copies at the root of synthetic/: the Hub gets them per config under data/<config>/. Its
# snapshots (distill.snapshot_every) are a local measurement, never published.
SYNTHETIC_LOCAL_ONLY = [IMAGES_FILE, SYNTHETIC_JSON, PREVIEW_FILE, f"{SNAPSHOTS_DIR}/*", "*.tmp", "*.tmp.png"]
STATISTICS_LOCAL_ONLY = [f"{FEATURES_DIR}/*", "*.tmp"]


@dataclass
class Upload:
    """One folder to one Hub repo, in one commit."""

    what: str
    repo_id: str
    repo_type: str
    folder: Path
    ignore_patterns: list[str]
    # Files on the Hub that this commit replaces: those matching and not uploaded again are deleted (stale).
    delete_patterns: list[str]


TEXT_SUFFIXES = (".json", ".md", ".yaml", ".txt")


def uploads(config: Config, names: RepoNames, folders: dict[str, Path | None]) -> list[Upload]:
    dataset_configs = []
    if folders.get("dataset") is not None:
        dataset_configs = sorted(path.name for path in (folders["dataset"] / VARIANTS_DIR).iterdir() if path.is_dir())
    plans = {
        # Other runs' configs in the same dataset repo are kept: only this folder's configs are replaced.
        "dataset": (names.dataset, "dataset", SYNTHETIC_LOCAL_ONLY,
                    [f"{VARIANTS_DIR}/{name}/*" for name in dataset_configs]),
        "model": (names.model, "model", ["*.tmp"], ["*"]),
        # A model repo: its safetensors + json files would make the dataset viewer mistake it for a dataset.
        "statistics": (names.statistics, "model", STATISTICS_LOCAL_ONLY, ["*"]),
    }
    return [
        Upload(what, plans[what][0], plans[what][1], folders[what], list(plans[what][2]), list(plans[what][3]))
        for what in config.hub.folders if folders.get(what) is not None
    ]


def _matches(path: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def commit_operations(api, upload: Upload, redact: PathRedactor, revision: str | None,
                      replace: dict[str, bytes] | None = None) -> list:
    """Every file of the folder (text with local paths shortened), ``replace``'d files, and deletions of stale ones."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    replace = replace or {}
    additions = []
    for path in sorted(upload.folder.rglob("*")):
        relative = path.relative_to(upload.folder).as_posix()
        if not path.is_file() or _matches(relative, upload.ignore_patterns):
            continue
        if relative in replace:
            content: bytes | str = replace[relative]
        elif path.suffix in TEXT_SUFFIXES:
            content = redact(path.read_text()).encode()
        else:
            content = str(path)
        additions.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))
    uploaded = {operation.path_in_repo for operation in additions}
    try:
        remote = api.list_repo_files(upload.repo_id, repo_type=upload.repo_type, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        remote = []
    deletions = [
        CommitOperationDelete(path_in_repo=path) for path in remote
        if path not in uploaded and path != ".gitattributes" and _matches(path, upload.delete_patterns)
    ]
    return deletions + additions


def hub_dataset_card_data(api, repo_id: str, revision: str | None):
    """The metadata of the dataset card on the Hub, or None for a repo without one."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename=CARD_FILE, repo_type="dataset", revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    return DatasetCard.load(path).data


def _describe_failure(error: Exception) -> str:
    """The error's class and text, with the HTTP status when the text leaves it out (the Hub's often does)."""
    text = f"{error.__class__.__name__}: {error}"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return text if status is None or str(status) in text else f"{text} (HTTP {status})"


def publish(config: Config, names: RepoNames, facts: RunFacts, folders: dict[str, Path | None],
            license_name: str | None) -> list[str]:
    """One commit per exported folder (create_repo(exist_ok=True) first); returns the repo or pull-request URLs.

    The token is whatever huggingface_hub finds (HF_TOKEN, the login cache); it is never read
    here. A failure leaves the local folders as they are and raises :class:`PublishError` naming
    what to re-run.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    hub = config.hub
    api = HfApi()
    done, failed = [], []
    for upload in uploads(config, names, folders):
        try:
            api.create_repo(repo_id=upload.repo_id, repo_type=upload.repo_type, private=hub.private, exist_ok=True)
            if hub.revision:
                api.create_branch(upload.repo_id, branch=hub.revision, repo_type=upload.repo_type, exist_ok=True)
            replace = {}
            if upload.what == "dataset":
                hub_card_data = hub_dataset_card_data(api, upload.repo_id, hub.revision)
                if hub_card_data is not None:
                    # The repo's card lists the configs other runs pushed too; the local card keeps describing the
                    # local folder.
                    variants_root = upload.folder / VARIANTS_DIR
                    local = [read_variant(path) for path in sorted(variants_root.iterdir()) if path.is_dir()]
                    card = dataset_card(local, facts, names, license_name=license_name, hub_card_data=hub_card_data)
                    replace[CARD_FILE] = str(card).encode()
            commit = api.create_commit(
                repo_id=upload.repo_id, repo_type=upload.repo_type, revision=hub.revision, create_pr=hub.create_pr,
                operations=commit_operations(api, upload, facts.redact, hub.revision, replace),
                commit_message=f"sfm-hf export: {upload.what} ({names.dataset_config})",
            )
            prefix = "datasets/" if upload.repo_type == "dataset" else ""
            done.append(getattr(commit, "pr_url", None) or f"https://huggingface.co/{prefix}{upload.repo_id}")
        except (HfHubHTTPError, HTTPError, OSError, ValueError) as error:
            failed.append(f"{upload.what} -> {upload.repo_id}: {_describe_failure(error)}")
    if failed:
        raise PublishError(
            "Upload failed for " + "; ".join(failed) + f". The local folders in {facts.output_dir} are intact; after "
            "fixing the cause (login: `hf auth login`; network; permissions on the org) re-run only the upload with "
            f"`sfm-hf --config <recipe> --output_dir {facts.output_dir} --stages export --hub.push true`."
            + (f" Already uploaded: {', '.join(done)}." if done else "")
        )
    return done



def folder_bytes(folder: Path, ignore: list[str] | None = None) -> int:
    """Bytes of the files under ``folder`` that an upload with ``ignore`` patterns would send."""
    return sum(
        path.stat().st_size for path in folder.rglob("*")
        if path.is_file() and not _matches(path.relative_to(folder).as_posix(), ignore or [])
    )

