"""Adapters that let RL frameworks outside TRL use POLAR rewards: verl (`verl.compute_score`,
`verl.compute_score_async`, `verl.compute_score_batch`), OpenRLHF (`openrlhf.reward_func`) and ms-swift
(`ms_swift`, an ORM plugin).

The frameworks load a reward *file* by path (verl's ``custom_reward_function.path``, OpenRLHF's
``--reward.remote_url``, ms-swift's ``--external_plugins``), so the adapter modules import only absolute
``trl_polar`` names and take their settings, `AdapterSettings`, from ``TRL_POLAR_*`` environment variables and an
optional JSON or YAML file named by ``TRL_POLAR_CONFIG`` (environment variables win). `settings` parses them once per
process (again only when the ``TRL_POLAR_*`` variables change), not once per sample.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trl_polar.failures import FailurePolicy
from trl_polar.rewards import STRIP_THINK_DEFAULT
from trl_polar.serving.get_reward import DEFAULT_FAILURE_REWARD, to_python

logger = logging.getLogger(__name__)
ENV_PREFIX = "TRL_POLAR_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_lock = threading.Lock()
_rewards: dict[Any, Any] = {}
_settings: dict[tuple, AdapterSettings] = {}

__all__ = ["AdapterSettings", "get_reward", "policy", "settings", "to_python"]


class _ConfigFile(PydanticBaseSettingsSource):
    """The JSON or YAML file named by ``TRL_POLAR_CONFIG``: the same keys as the variables, in lower case."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ reads the whole file at once
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        unknown = sorted(set(data) - set(AdapterSettings.model_fields))
        if unknown:
            keys = sorted(AdapterSettings.model_fields)
            raise ValueError(f"{path} has unknown keys {unknown}; the keys are {keys}.")
        return data


class AdapterSettings(BaseSettings):
    """The adapters' settings: ``TRL_POLAR_<FIELD>`` variables, else the ``TRL_POLAR_CONFIG`` file, else defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    model: str | None = Field(None, description="The saved POLAR reward model (required unless `url` is set).")
    url: str | None = Field(None, description="Reward servers instead, comma-separated replicas with failover.")
    backend: str | None = Field(None, description="The servers' wire shape: trl-polar, vllm, sglang or lmdeploy.")
    api_key: str | None = Field(None, description="Sent to the servers as Authorization: Bearer KEY.")
    device: str | None = Field(None, description="Where an in-process model scores (default: cuda if visible).")
    dtype: str = Field("auto", description="In-process dtype: auto (bf16 on GPU), bf16, fp16, fp32.")
    max_tokens: int = Field(16384, description="Micro-batch token budget of the in-process scorer.")
    strip_think: bool = Field(STRIP_THINK_DEFAULT, description="Remove <think>...</think> before scoring.")
    wrapper: str = Field("sft", description="The POLAR input wrapper: sft or pretrain.")
    baseline: bool = Field(False, description="Subtract r(prompt, ref, ref): a copy of the reference scores 0.")
    clip: str | None = Field(None, description='Clip rewards: "c" for [-c, c] or "low,high".')
    sigmoid_scale: float | None = Field(None, description="sigmoid(reward / scale), applied last.")
    on_error: str | None = Field(None, description="Failure policy: raise or none (default: the adapter's).")
    score_timeout: float | None = Field(None, description="Seconds a sample may wait for its score.")
    prompt_key: str = Field("prompt", description="verl: the extra_info key holding the prompt.")
    batch_window_ms: float = Field(10.0, description="How long per-sample calls wait to be scored together.")
    failure_reward: float = Field(
        DEFAULT_FAILURE_REWARD, allow_inf_nan=False, description="OpenRLHF: the reward of a failed rollout."
    )
    reference_column: str = Field("solution", description="ms-swift: the dataset column holding the reference.")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return init_settings, env_settings, _ConfigFile(settings_cls)

    @field_validator("on_error")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None:
            FailurePolicy(value)  # names a bad value now, not at the first failure
        return value

    def clip_range(self) -> float | tuple[float, ...] | None:
        """``clip`` as `PolarReward` takes it.

        >>> AdapterSettings(model="m", clip="-5,1").clip_range()
        (-5.0, 1.0)
        """
        if not self.clip:
            return None
        parts = tuple(float(p) for p in self.clip.split(","))
        return parts[0] if len(parts) == 1 else parts


def _one_line(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else "?"
        problems.append(f"{ENV_PREFIX}{key.upper()} (`{key}` in the {CONFIG_ENV} file) {e['msg'].lower()}")
    return "; ".join(problems) + "."


def settings() -> AdapterSettings:
    """The adapters' settings, parsed once per process for each set of ``TRL_POLAR_*`` variables.

    Raises ValueError naming the variable when a value does not parse, or when neither a model nor a URL is set."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    found = _settings.get(key)
    if found is not None:
        return found
    try:
        found = AdapterSettings()
    except ValidationError as err:
        raise ValueError(_one_line(err)) from None
    if not found.model and not found.url:
        raise ValueError(
            "No POLAR reward model configured: set TRL_POLAR_MODEL=/path/to/polar-rm (a model saved by trl-polar or "
            "converted with `trl-polar convert`) or TRL_POLAR_URL=http://host:port[,http://host2:port] (reward "
            "servers), or name `model` or `url` in the TRL_POLAR_CONFIG file."
        )
    with _lock:
        return _settings.setdefault(key, found)


def policy(config: AdapterSettings, default_on_error: str = "raise") -> FailurePolicy:
    """The failure policy of an adapter: the configured one, or the adapter's default ``on_error``."""
    return FailurePolicy(config.on_error or default_on_error, config.score_timeout)


def _scorer(config: AdapterSettings) -> Any:
    import torch

    if config.url:
        from trl_polar.serving.client import PolarClient

        # A comma-separated list is a set of replicas with failover.
        urls = [u.strip() for u in config.url.split(",") if u.strip()]
        return PolarClient(
            urls=urls,
            backend=config.backend or "trl-polar",
            api_key=config.api_key,
            wrapper=config.wrapper,
            template=config.model,
        )
    from trl_polar.scorer import PolarScorer

    # Engines place their workers with Ray or torchrun, not accelerate: pick the device here, never from
    # accelerate's state, which would try to join the engine's process group.
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not config.device and device == "cpu":
        # verl's reward-loop workers and TRL's async rollout workers hold no GPU: say so, once per model.
        logger.warning(
            "Scoring POLAR rewards on CPU: this process sees no GPU (verl's reward loop and TRL's async "
            "rollout workers get none). Serve the model with `trl-polar serve --model %s` on a GPU and "
            "set TRL_POLAR_URL=http://HOST:8000, or set TRL_POLAR_DEVICE=cpu to keep this.",
            config.model,
        )
    return PolarScorer(config.model, max_tokens_per_batch=config.max_tokens, device=device, dtype=config.dtype)


def get_reward(config: AdapterSettings | None = None, *, on_error: str | None = None) -> Any:
    """The process-wide `PolarReward` for ``config`` (default: `settings`), built once (engines call from threads).

    ``on_error`` overrides the configured policy (the per-sample adapters score with "none" and apply the policy to
    each caller's own item)."""
    config = settings() if config is None else config
    if on_error is not None:
        config = config.model_copy(update={"on_error": on_error})
    with _lock:
        if config not in _rewards:
            from trl_polar.rewards import PolarReward

            _rewards[config] = PolarReward(
                _scorer(config),
                strip_think=config.strip_think,
                wrapper=config.wrapper,
                baseline=config.baseline,
                clip=config.clip_range(),
                sigmoid_scale=config.sigmoid_scale,
                on_missing_reference="error",
                on_error=config.on_error or "raise",
                score_timeout=config.score_timeout,
            )
        return _rewards[config]
