"""``flash_attn.utils``."""
