"""The one base class for mistakes a user can fix (bad recipe, missing split, unknown backbone, ...).

Entry points print these as one clear line instead of a traceback.
"""


class UserError(ValueError):
    """Something in the user's input is wrong; the message says what and what exists instead."""


class StageInputError(UserError):
    """A stage was asked to run before the stage whose outputs it reads."""


class RunStopped(RuntimeError):
    """A run stopped on purpose because going on would waste work; what was saved is kept."""
