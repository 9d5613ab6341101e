"""Small shared helpers with no better home."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Keep the console for our progress bars and summaries: library chatter only at warning level."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
