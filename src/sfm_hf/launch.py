"""``python -m sfm_hf.launch [accelerate launch options] recipes/distill.py ...``: accelerate launch that keeps
the script's exit status and one-line errors.

``accelerate launch`` answers any failed run with its own traceback (``CalledProcessError`` for one
process, torchrun's ``ChildFailedError`` for several) and exit status 1, which buries the
script's ``error: ...`` line and turns a user mistake (2) or a deliberate stop (3) into a crash.
Its ``-q`` flag only covers one process and still exits 1. This wrapper runs the same launcher
in-process and exits with the failed process's own status, adding nothing to what it printed.
"""

from __future__ import annotations

import logging
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun's agent logs its own multi-line failure summary; the processes already said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:
        return shell_status(error.returncode)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return shell_status(failure.exitcode)
    return 0


def shell_status(returncode: int) -> int:
    """A child's return code as a shell reports it: a process killed by signal N exits 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
