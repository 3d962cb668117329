"""``ray.experimental``."""
