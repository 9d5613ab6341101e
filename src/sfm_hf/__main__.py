"""``python -m sfm_hf`` (and ``accelerate launch -m sfm_hf``): the same command line as ``sfm-hf``."""

import sys

from sfm_hf.cli import main

sys.exit(main())
