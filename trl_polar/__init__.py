"""POLAR reward models (policy discriminators) for the Hugging Face TRL ecosystem.

Heavy entry points (trainer, scorer, reward callable) are imported on first use, so that `import trl_polar` and the
CLI start fast.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .template import PolarEncoding, PolarPairEncoding, PolarTemplate, common_prefix_length, flatten

__version__ = "0.1.0"

_LAZY = {
    "PolarConfig": "config",
    "PolarDataCollator": "collator",
    "PolarRewardTrainer": "trainer",
    "PolarScorer": "scorer",
    "PolarReward": "rewards",
    "PolarClient": "serving.client",
    "load_preference_dataset": "data.loading",
    "load_reward_model": "modeling",
    "prepare_reward_model": "modeling",
    "add_polar_tokens": "modeling",
}

__all__ = [
    "PolarEncoding",
    "PolarPairEncoding",
    "PolarTemplate",
    "__version__",
    "common_prefix_length",
    "flatten",
    "PolarConfig",
    "PolarDataCollator",
    "PolarRewardTrainer",
    "PolarScorer",
    "PolarReward",
    "PolarClient",
    "load_preference_dataset",
    "load_reward_model",
    "prepare_reward_model",
    "add_polar_tokens",
]

if TYPE_CHECKING:
    from .collator import PolarDataCollator
    from .config import PolarConfig
    from .data.loading import load_preference_dataset
    from .modeling import add_polar_tokens, load_reward_model, prepare_reward_model
    from .rewards import PolarReward
    from .scorer import PolarScorer
    from .serving.client import PolarClient
    from .trainer import PolarRewardTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_polar' has no attribute {name!r}")
