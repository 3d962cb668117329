"""``ray.util``: the names the callers import."""

from ray.util import placement_group, scheduling_strategies  # noqa: F401
