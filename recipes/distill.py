"""Every stage from a checkout: ``python -m sfm_hf.launch recipes/distill.py --config recipes/<name>.yaml``
(``accelerate launch`` with its options, passing on the run's one-line error and exit status).

The same command line as the installed ``sfm-hf`` console script (``sfm_hf.cli``); ``--help`` lists it.
"""

import sys

from sfm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
