"""What a backbone or dataset name (a Hub id, a local folder, an open_clip id) is called where it is shown.

- :func:`short_name`: tables, plots, progress lines and titles ('facebook/dinov2-small' -> 'dinov2-small');
- :func:`slug`: Hub repo and dataset-config names (lowercase, repo-safe);
- :func:`backbone_slug`: file names inside an output_dir (unique per name, so two folders called alike never
  share a cache);
- :func:`public_name`: anything published (a Hub id as it is, a local path by its folder name only).

The first three start from :func:`base_name`, the last part of the name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Prefixes that mark an open_clip model id rather than a transformers checkpoint.
OPEN_CLIP_PREFIXES = ("hf-hub:", "local-dir:")


def base_name(name: str) -> str:
    """The last part of a Hub id, folder or open_clip id ('hf-hub:org/model' -> 'model'); '' when it has none."""
    return Path(name.split(":", 1)[-1].rstrip("/")).name


def short_name(name: str) -> str:
    """What tables, plots and logs call a backbone or dataset: its last part."""
    return base_name(name) or name


def slug(name: str) -> str:
    """A short repo-name-safe form of a Hub id or folder: its last part, lowercased, odd characters -> '-'."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", base_name(name).lower())
    cleaned = re.sub(r"[-.]{2,}", "-", cleaned).strip("-.")
    return cleaned or "run"


def backbone_slug(name: str) -> str:
    """A file-name-safe id of a backbone: ``org--model`` for Hub ids, ``<folder>-<hash>`` otherwise."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name.replace("/", "--")
    stem = re.sub(r"[^\w.-]+", "-", base_name(name)).strip("-") or "backbone"
    return f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def is_hub_id(name: str) -> bool:
    """A Hub repo id rather than a local folder (cards link and cite only Hub ids)."""
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).exists() or name.startswith(OPEN_CLIP_PREFIXES):
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return "/" in name


def public_name(name: str) -> str:
    """What a published file may say about a dataset, backbone or folder: a Hub id as it is, a local path by its
    folder's base name (the absolute path says nothing to a reader and tells about the publisher's machine)."""
    for prefix in OPEN_CLIP_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return prefix + (rest if prefix == "hf-hub:" else public_name(rest))
    if not name or is_hub_id(name):
        return name
    if Path(name).exists() or "/" in name or name.startswith(("~", ".")):
        return Path(name).name or name
    return name
