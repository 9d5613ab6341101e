"""The one base class for mistakes a user can fix (bad recipe, missing split, unknown backbone, ...).

Entry points print these as one clear line instead of a traceback.
"""


class UserError(ValueError):
    """Something in the user's input is wrong; the message says what and what exists instead."""


class StageInputError(UserError):
    """A stage was asked to run before the stage whose outputs it reads."""


class RunStopped(RuntimeError):
    """A run stopped on purpose because going on would waste work; what was saved is kept."""


def describe_error(error: BaseException, limit: int = 300) -> str:
    """'SafetensorError: invalid header length': an exception's type and its message's first line, as a one-line
    error quotes the cause (libraries' messages run to many lines)."""
    lines = str(error).strip().splitlines()
    return error.__class__.__name__ + (f": {lines[0][:limit]}" if lines else "")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a stage; the message says what was kept and how to go on."""
