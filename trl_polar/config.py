"""`PolarConfig`: `trl.RewardConfig` plus what POLAR training needs (template, batching, loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import RewardConfig

from .checks import check_positive_int
from .template import (
    CUT_SIDES,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_RESPONSE_LENGTH,
    DEFAULT_REWARD_TOKEN,
    DEFAULT_SEPARATOR,
    RESERVED_TOKENS,
    WRAPPERS,
)

BATCHING_MODES = ("padded", "packed", "shared_prefix")
LOSS_TYPES = ("bradley_terry", "listwise")


@dataclass
class PolarConfig(RewardConfig):
    """Configuration of `PolarRewardTrainer`.

    Every `trl.RewardConfig` / `transformers.TrainingArguments` field is accepted; the fields below are added (and
    ``max_length`` changes meaning: POLAR truncates inputs through its template instead of filtering rows out).

    Plain ``PolarConfig()`` keeps `trl.RewardConfig`'s optimisation defaults: learning_rate 1e-4, 3 epochs, a linear
    schedule without warmup, AdamW betas (0.9, 0.999), per-device batch 8 without accumulation (and TRL's bf16 and
    gradient checkpointing). These are not POLAR's: for the paper's hyperparameters (one epoch, betas (0.9, 0.95),
    3% warmup, cosine decay to 0.1 x lr, the paper's learning rate and global batch) use `from_recipe`. Its own
    fields below default to the released checkpoints' template (max_length 16384, max_response_length 4096,
    'sft' wrapper).

    Example::

        args = PolarConfig(output_dir="polar-rm", batching="shared_prefix", max_length=4096)
        args = PolarConfig.from_recipe("polar-finetune", output_dir="polar-rm", num_params=1.8e9)
    """

    # ---------------------------------------------------------------------------------------------- the template
    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={
            "help": "Token budget of one POLAR sequence (prompt twice, reference, candidate, 4 reserved tokens). "
            "Unlike TRL's RewardConfig, longer rows are truncated the way POLAR's template does (responses keep "
            "their first `max_response_length` tokens, the prompt keeps its last tokens), never dropped; truncated "
            "rows are counted and logged. The released checkpoints use 16384."
        },
    )
    max_response_length: int = field(
        default=DEFAULT_MAX_RESPONSE_LENGTH,
        metadata={"help": "The most tokens the reference and each candidate may keep (POLAR's default: 4096)."},
    )
    response_cut_side: str = field(
        default="right",
        metadata={
            "help": "How an over-long reference or candidate is cut: 'right' keeps its start (as POLAR was trained), "
            "'left' keeps its end.",
            "choices": list(CUT_SIDES),
        },
    )
    wrapper: str = field(
        default="sft",
        metadata={
            "help": "Default input wrapper for rows without a `wrapper` column: 'sft' puts '\\n' between the prompt "
            "and each response (the released checkpoints' format), 'pretrain' joins them directly.",
            "choices": list(WRAPPERS),
        },
    )
    separator: str = field(
        default=DEFAULT_SEPARATOR,
        metadata={"help": "Text between the reference half and the candidate half; added as a special token if new."},
    )
    reward_token: str = field(
        default=DEFAULT_REWARD_TOKEN,
        metadata={
            "help": "Token appended to every input; the value head reads its hidden state. Added as a special token "
            "if the tokenizer lacks it."
        },
    )
    # ---------------------------------------------------------------------------------------------- the model
    zero_init_head: bool = field(
        default=True,
        metadata={
            "help": "Start a newly created value head at zero, as POLAR does (every input first scores 0). A "
            "checkpoint that already has a trained head keeps it."
        },
    )
    # ---------------------------------------------------------------------------------------------- batching
    batching: str = field(
        default="shared_prefix",
        metadata={
            "help": "How a batch is laid out. 'padded': TRL's layout, one padded row per sequence. 'packed': all "
            "sequences concatenated into rows without padding, position ids restarting per sequence. "
            "'shared_prefix': the prompt/reference prefix common to a row's candidates is computed once and each "
            "candidate attends to it through segment attention (the batch's real tokens as one unpadded row; "
            "models with sliding-window layers fall back to 'packed'). All three give the same loss and gradients.",
            "choices": list(BATCHING_MODES),
        },
    )
    max_row_length: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens per row in 'packed' batching; rows are filled greedily and a group (pair or ranking) "
            "longer than this gets a row of its own. None: one group per row with sdpa or eager attention (their "
            "cost grows with the square of the row length, so longer rows only cost more), and 2 * max_length, as "
            "POLAR's own packing, with kernels that read packed rows natively (flash attention). A 'shared_prefix' "
            "batch is always one unpadded row."
        },
    )
    # ---------------------------------------------------------------------------------------------- the loss
    loss_type: str = field(
        default="bradley_terry",
        metadata={
            "help": "'bradley_terry': -log sigmoid(r_chosen - r_rejected), POLAR's pre-training and fine-tuning loss "
            "(optional `margin` column and center_rewards_coefficient as in TRL). 'listwise': Plackett-Luce over "
            "k-way rankings (a `candidates` column, best first); it equals Bradley-Terry for k = 2.",
            "choices": list(LOSS_TYPES),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is None:
            raise ValueError(
                "`max_length` cannot be None for POLAR: it is the template's token budget. Use 16384 (the released "
                "checkpoints' value) or another positive integer."
            )
        for name in ("max_length", "max_response_length"):
            check_positive_int(name, getattr(self, name))
        # Two copies of the prompt need at least one token each, so every row fits: no row is ever dropped.
        if self.max_length - RESERVED_TOKENS - 2 * self.max_response_length < 2:
            raise ValueError(
                f"`max_length`={self.max_length} is too small for `max_response_length`={self.max_response_length}: "
                f"the reference and the candidate may take {2 * self.max_response_length} tokens plus "
                f"{RESERVED_TOKENS} reserved, leaving no room for the prompt. Set max_length >= "
                f"{2 * self.max_response_length + RESERVED_TOKENS + 2} or lower max_response_length."
            )
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            # Trainer would run no step and save the untouched model as if trained.
            raise ValueError(
                f"`num_train_epochs`={self.num_train_epochs:g} with no `max_steps` trains nothing. Set "
                "num_train_epochs > 0 (e.g. 1) or max_steps > 0."
            )
        self._check_choice("response_cut_side", CUT_SIDES)
        self._check_choice("wrapper", WRAPPERS)
        self._check_choice("batching", BATCHING_MODES)
        self._check_choice("loss_type", LOSS_TYPES)
        for name in ("separator", "reward_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}.")
        check_positive_int("max_row_length", self.max_row_length, optional=True)
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                "`center_rewards_coefficient` must be >= 0 (TRL recommends 0.01), got "
                f"{self.center_rewards_coefficient}."
            )

    @classmethod
    def from_recipe(cls, name: str, **kwargs: Any) -> PolarConfig:
        """A config with the paper's hyperparameters: ``"polar-pretrain"`` or ``"polar-finetune"``.

        Keyword arguments are the recipe's inputs (``num_params``, ``base_tokens``, ``rm_tokens``,
        ``global_batch_size``, ``world_size``; see `trl_polar.recipes.recipe_values`) or any config field, which
        overrides the recipe's value. ``per_device_train_batch_size`` stays as given (default 8) and
        ``gradient_accumulation_steps`` is set so that per-device batch x accumulation x world size is the
        paper's global batch (320 for fine-tuning; the scaling law's for pre-training), unless given.

        Example::

            args = PolarConfig.from_recipe("polar-finetune", output_dir="polar-7b", num_params=7e9)  # lr 2e-5
            args = PolarConfig.from_recipe("polar-pretrain", output_dir="polar-pt", num_params=1.8e9,
                                           base_tokens=2.5e12, rm_tokens=0.94e12, per_device_train_batch_size=4)
        """
        from .recipes import RECIPE_INPUTS, recipe_values

        inputs = {key: kwargs.pop(key) for key in RECIPE_INPUTS if key in kwargs}
        for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return cls(**{**recipe_values(name, **inputs), **kwargs})

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")

    def template_kwargs(self) -> dict:
        """The `PolarTemplate` parameters this config sets (besides separator and reward token)."""
        return {
            "max_length": self.max_length,
            "max_response_length": self.max_response_length,
            "response_cut_side": self.response_cut_side,
        }
