"""Small shared helpers with no better home: quiet logging, atomic writes, the output_dir lock, the versions
of the libraries a run used."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import StageInputError, UserError, describe_error
from .layout import LOCK_FILE


def quiet_libraries() -> None:
    """Keep the console for our progress bars and summaries: library chatter only at warning level."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# The libraries whose release can move a published number (weights' init and loading, data decoding, numerics).
RECORDED_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "huggingface_hub", "safetensors", "numpy",
                     "timm", "pillow", "scikit-learn")


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`RECORDED_PACKAGES` (None: not installed) and Python's, written into
    results.json, synthetic.json and the cards so that a published number names the environment that made it.
    Read from the installed metadata: nothing is imported."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{package: installed(package) for package in RECORDED_PACKAGES}}


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name to write ``path`` through; it replaces ``path`` only when the block succeeds.

    A crash never leaves half a file, and the name carries the pid so that two processes writing
    the same file never write into each other's temporary (the suffix is kept for writers that
    pick the format from it). A write that fails on a full disk is a :class:`DiskFullError` naming ``path``.
    """
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        temporary.replace(path)
    except Exception as error:  # noqa: BLE001 -- every writer (torch, safetensors, PIL, text) says "disk full" its own way
        # Judged before the temporary goes: its bytes are part of what filled the disk.
        if is_disk_full(error, path.parent):
            raise DiskFullError(disk_full_message(path)) from None
        raise
    finally:
        temporary.unlink(missing_ok=True)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Less free space than this after a failed write means the disk filled up (torch.save says only "file write failed").
NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(UserError):
    """The disk (or quota) holding the outputs filled up while a file was written."""


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means that no space was left."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full_message(path: Path | str | None) -> str:
    where = f" while writing {path}" if path else ""
    return (
        f"No space left on the device{where}: free some space (or set `output_dir` to a folder on a disk with room) "
        "and run the same command again. Every file already written is complete: each is written to a temporary "
        "name and renamed only once whole."
    )


def save_tensors_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def unreadable_file(path: Path, what: str, remedy: str, error: BaseException,
                    error_type: type[UserError] = StageInputError) -> UserError:
    """The one-line error for a file that exists but cannot be read: truncated, empty or of another kind."""
    return error_type(f"{path} cannot be read ({describe_error(error)}): it is truncated or not {what}; {remedy}.")


def load_tensors(path: Path, what: str, remedy: str, *, keys: tuple[str, ...] = (),
                 error_type: type[UserError] = StageInputError) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (``what`` it should be, e.g. "a feature-cache shard").

    A damaged file, or one without the tensors ``keys``, is a one-line ``error_type`` naming the file and
    ``remedy`` (what to do), never a SafetensorError traceback from deep inside a stage.
    """
    try:
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 -- safetensors raises several types for a damaged file
        raise unreadable_file(path, what, remedy, error, error_type) from None
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise error_type(f"{path} lacks the tensor(s) {missing}: it is not {what}; {remedy}.")
    return tensors


def read_json(path: Path, what: str, remedy: str, *, error_type: type[UserError] = StageInputError) -> Any:
    """The JSON value in ``path`` (``what`` it should be); a damaged file is a one-line ``error_type`` with ``remedy``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise unreadable_file(path, what, remedy, error, error_type) from None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``: free GPU memory, or on the host the smaller of MemAvailable
    and what the cgroup (container) limit leaves; None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: what later stages record to tell whether their input changed."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputDirError(UserError):
    """The output_dir cannot be used: a file, not writable, or in use by another run."""


def prepare_output_dir(path: Path) -> None:
    """Create ``path`` (and check it is a writable folder) with a one-line error instead of an OSError."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"`output_dir` {str(path)!r} is a file: give a folder (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(
            f"Cannot create `output_dir` {str(path)!r} ({error.strerror or error}): choose a folder you can write to."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"`output_dir` {str(path)!r} is not writable: choose a folder you can write to.")


class OutputDirLock:
    """An exclusive lock on an output_dir for one run, so that two runs never interleave their outputs.

    The lock is an ``flock`` on ``<output_dir>/.lock``, which holds the owner's pid and host: the
    kernel releases it when the owner dies, so a lock left by a killed run is simply taken over.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown pid"
            handle.close()
            raise OutputDirError(
                f"`output_dir` {str(self.path.parent)!r} is in use by another run ({holder}): wait for it to finish, "
                "or use another output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def share_from_main(accelerator, compute: Callable[[], Any]) -> Any:
    """Compute on the main process and give every process the (picklable) result.

    A user error on the main process is raised on every process, which would otherwise wait forever.
    """
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            payload = [compute()]
        except UserError as error:
            payload = [error]
    broadcast_object_list(payload)
    if isinstance(payload[0], UserError):
        raise payload[0]
    return payload[0]


def gather_lists(accelerator, items: list) -> list:
    """Every process's ``items`` (picklable), concatenated in process order, on every process."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)
