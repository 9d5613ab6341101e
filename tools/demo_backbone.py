"""Write src/sfm_hf/assets/tiny-vit: the demo's pre-trained tiny ViT, committed so that the demo and the tests
compute the same numbers on every machine.

Pre-trained where it runs, the backbone came out different on each CPU type (another vector instruction set or
BLAS code path grows other weights over hundreds of Adam steps), and the demo's golden classifier with it. This
re-runs the pre-training of sfm_hf.demo (settings DEMO_BACKBONE_SETTINGS) in a process pinned to the baseline
x86-64 kernels (PINNED_KERNELS) and writes the weights with a manifest (the recipe, each file's sha256, what it ran
on); tests/test_demo.py fails when the folder or the recipe changes without this. Run it as `make demo-backbone`
after changing the pre-training, and commit the folder with the demo numbers it moves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from sfm_hf.demo import DEMO_BACKBONE, PINNED_KERNELS, demo_backbone_problems, write_demo_backbone

    if not DEMO_BACKBONE.is_relative_to(REPO / "src"):
        sys.exit(f"error: sfm_hf is imported from {DEMO_BACKBONE.parents[1]}, not from this checkout: run "
                 f"`make install` here (or set PYTHONPATH={REPO / 'src'})")
    if any(os.environ.get(name) != value for name, value in PINNED_KERNELS.items()):
        # The kernel libraries read these once, at their first call: only a fresh process is sure to obey them.
        return subprocess.run([sys.executable, __file__], env={**os.environ, **PINNED_KERNELS}).returncode
    print(f"pre-training the demo backbone on pinned kernels ({' '.join(f'{k}={v}' for k, v in PINNED_KERNELS.items())}"
          "), a minute or a few ...", flush=True)
    write_demo_backbone(DEMO_BACKBONE)
    problems = demo_backbone_problems(DEMO_BACKBONE)
    if problems:
        sys.exit("error: " + "; ".join(problems))
    print(f"wrote {DEMO_BACKBONE.relative_to(REPO)}: commit it with the demo numbers it moves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
