"""sfm-hf: Statistical Flow Matching dataset distillation for frozen vision backbones.

usage:
  sfm-hf [--config recipes/<name>.yaml] [--key value ...]        run the recipe's stages (one process)
  accelerate launch -m sfm_hf [--config ...] [--key value ...]     the same on every process accelerate starts
  accelerate launch recipes/distill.py [...]                       the same, from a checkout
  sfm-hf merge-statistics --help                                   merge Stage I statistics of several runs

Without --config it runs the embedded default recipe: the offline digits demo.
Any option can be overridden: --ipc 2 --distill.iterations 50 --stages statistics,distill.
--report_to X is another name for --trackers X (as in the transformers example scripts).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# Sub-commands: name -> "module:function(argv) -> exit code". Imported only when named.
COMMANDS: dict[str, str] = {"merge-statistics": "sfm_hf.merge:main"}
ALIASES = {"--report_to": "--trackers"}
# Exit status of a run stopped by Ctrl-C, as a shell reports a process ended by SIGINT (python -m sfm_hf.launch too).
INTERRUPTED = 130
# Exit status when the reader of stdout went away (`sfm-hf --help | head -1`), as for a process ended by SIGPIPE.
BROKEN_PIPE = 141
NOTHING_STARTED = "interrupted before any stage started."


def main(argv: list[str] | None = None) -> int:
    """The console script ``sfm-hf``, ``python -m sfm_hf`` and ``recipes/distill.py``; returns the exit code."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # Nothing more can reach the reader; point stdout at /dev/null so that the flush at exit stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except KeyboardInterrupt:
        # Ctrl-C while the libraries load (seconds on a busy machine); run() reports one during the stages.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"stopped: {NOTHING_STARTED}", file=sys.stderr)
        return INTERRUPTED


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        module, function = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    if "-h" in argv or "--help" in argv:
        # Only the config module: the answer must not wait for torch.
        from .config import help_text

        print(__doc__)
        print(help_text())
        sys.stdout.flush()  # a closed pipe shows here, inside main's handler
        return 0
    return run(_expand_aliases(argv))


def _expand_aliases(argv: list[str]) -> list[str]:
    expanded = []
    for token in argv:
        key, equals, value = token.partition("=")
        expanded.append(ALIASES.get(key, key) + equals + value)
    return expanded


def run(argv: list[str]) -> int:
    """Parse the recipe and overrides, run the stages; user mistakes end as one ``error:`` line (exit 2)."""
    from accelerate import Accelerator, PartialState
    from accelerate.logging import get_logger
    from accelerate.utils import parse_flag_from_env

    from .config import parse_config, parse_overrides
    from .demo import demo_config
    from .errors import RunInterrupted, RunStopped, UserError
    from .runner import run_stages
    from .utils import DISK_FULL_ERRNOS, disk_full_message, quiet_libraries

    quiet_libraries()
    show_progress_logs()
    # The first state fixes the backend for the Accelerator made later: without cpu=True two CPU ranks
    # (ACCELERATE_USE_CPU=1 ... --multi_gpu) would each run alone, as a world of one.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    accelerator = None
    try:
        recipe, overrides = parse_overrides(argv)
        default = None
        if recipe is None:
            with state.main_process_first():
                default = demo_config()
            get_logger(__name__).info(demo_notice(overrides))
        config = parse_config(argv, default)
        accelerator = Accelerator(log_with=config.trackers or None, project_dir=config.output_dir)
        run_stages(config, accelerator)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    except RunInterrupted as error:
        if state.is_local_main_process:
            print(f"stopped: {error}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        if state.is_local_main_process:
            print(f"stopped: {NOTHING_STARTED}", file=sys.stderr)
        return INTERRUPTED
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        print(f"error: {disk_full_message(error.filename)}", file=sys.stderr)
        return 2
    finally:
        if accelerator is not None:
            accelerator.end_training()
    return 0


def demo_notice(overrides: dict) -> str:
    """What a run without --config runs: the demo recipe, with the dataset or backbone the command line gives."""
    demo_parts = {"dataset": "scikit-learn digits", "backbone": "tiny ViT"}
    given = [key for key in demo_parts if key in overrides]
    if not given:
        return "No --config given: running the embedded demo recipe (scikit-learn digits, tiny ViT)."
    kept = [part for key, part in demo_parts.items() if key not in given]
    return (f"No --config given: the embedded demo recipe's settings with the {' and '.join(given)} given"
            + (f" (and the demo's {kept[0]})" if kept else "") + ".")


class _StageFormatter(logging.Formatter):
    """Stage summaries and progress lines as plain text; anything louder names its level and module.

    Info lines come from the main process only (accelerate's logger), so its "[RANK 0]" tag says nothing there.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO:
            return text.removeprefix("[RANK 0] ")
        return f"{record.levelname} {record.name}: {text}"


def show_progress_logs(level: int = logging.INFO) -> None:
    """The command line shows sfm_hf's info messages on stdout (a library user's logging setup decides alone)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_StageFormatter())
    package = logging.getLogger("sfm_hf")
    package.handlers[:] = [handler]
    package.setLevel(level)
    package.propagate = False
