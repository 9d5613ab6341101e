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
import sys

# Sub-commands: name -> "module:function(argv) -> exit code". Imported only when named.
COMMANDS: dict[str, str] = {}
ALIASES = {"--report_to": "--trackers"}


def main(argv: list[str] | None = None) -> int:
    """The console script ``sfm-hf``, ``python -m sfm_hf`` and ``recipes/distill.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module, function = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    if "-h" in argv or "--help" in argv:
        # Only the config module: the answer must not wait for torch.
        from .config import help_text

        print(__doc__)
        print(help_text())
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
    from accelerate.utils import parse_flag_from_env

    from .config import parse_config, parse_overrides
    from .demo import demo_config
    from .errors import RunStopped, UserError
    from .runner import run_stages
    from .utils import quiet_libraries

    quiet_libraries()
    # The first state fixes the backend for the Accelerator made later: without cpu=True two CPU ranks
    # (ACCELERATE_USE_CPU=1 ... --multi_gpu) would each run alone, as a world of one.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    accelerator = None
    try:
        recipe, _ = parse_overrides(argv)
        default = None
        if recipe is None:
            with state.main_process_first():
                default = demo_config()
            if state.is_main_process:
                print("No --config given: running the embedded demo recipe (scikit-learn digits, tiny ViT).")
        config = parse_config(argv, default)
        accelerator = Accelerator(log_with=config.trackers or None, project_dir=config.output_dir)
        run_stages(config, accelerator)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    finally:
        if accelerator is not None:
            accelerator.end_training()
    return 0
