"""``python -m trl_polar.serving --model PATH``: the same as ``trl-polar serve``, errors included (one line)."""

import sys

from ..cli import main

sys.argv[1:1] = ["serve"]
main()
