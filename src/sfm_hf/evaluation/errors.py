"""What Stage III raises when its inputs do not fit together."""

from __future__ import annotations

from ..errors import UserError


class EvaluationError(UserError):
    """Evaluation inputs that do not fit together; the message says what was found."""


class ProjectorMismatchError(EvaluationError):
    """A saved projector whose shape does not fit the eval backbone or the golden classifier."""
