"""The one entry point for every stage: ``python -m sfm_hf.launch recipes/distill.py --config recipes/<name>.yaml``
(``accelerate launch`` options; failures end with one ``error:`` line and exit status 2).

Without ``--config`` it runs the embedded default recipe: the offline digits demo.
Any option can be overridden: ``--ipc 2 --distill.iterations 50 --stages statistics,distill``.
"""

from __future__ import annotations

import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

from sfm_hf.config import help_text, parse_config, parse_overrides
from sfm_hf.demo import demo_config
from sfm_hf.errors import RunStopped, UserError
from sfm_hf.runner import run_stages
from sfm_hf.utils import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text())
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
