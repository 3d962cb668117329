"""``python -m trl_polar.cli``, as ``accelerate launch -m trl_polar.cli`` runs it."""

from . import main

main()
