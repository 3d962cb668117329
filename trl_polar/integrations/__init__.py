"""Adapters that let RL frameworks outside TRL use POLAR rewards: verl (`verl.compute_score`,
`verl.compute_score_async`, `verl.compute_score_batch`), OpenRLHF (`openrlhf.reward_func`) and ms-swift
(`swift`, an ORM plugin).

The frameworks load a reward *file* by path (verl's ``custom_reward_function.path``, OpenRLHF's
``--reward.remote_url``, ms-swift's ``--external_plugins``), so the adapter modules import only absolute
``trl_polar`` names and take their settings from the environment:

- ``TRL_POLAR_MODEL``: the saved POLAR reward model (required, unless the config file names it or a URL is set);
- ``TRL_POLAR_URL``: score with reward servers instead, e.g. ``http://10.0.0.5:8000,http://10.0.0.6:8000``
  (replicas with failover); ``TRL_POLAR_BACKEND`` ("trl-polar", "vllm", "sglang" or "lmdeploy"; the engines also
  need ``TRL_POLAR_MODEL`` for the tokenizer that formats their input) and ``TRL_POLAR_API_KEY``;
- ``TRL_POLAR_CONFIG``: a JSON or YAML file with any of the keys below (environment variables win);
- ``TRL_POLAR_DEVICE`` (default: cuda if available, else cpu), ``TRL_POLAR_DTYPE`` (default "auto": bf16 on GPU),
  ``TRL_POLAR_MAX_TOKENS`` (micro-batch token budget), ``TRL_POLAR_STRIP_THINK`` (default 1),
  ``TRL_POLAR_WRAPPER`` (default "sft"), ``TRL_POLAR_BASELINE`` (default 0), ``TRL_POLAR_CLIP`` (e.g. "10" or
  "-10,5"), ``TRL_POLAR_SIGMOID_SCALE``;
- the failure policy (`trl_polar.failures`): ``TRL_POLAR_ON_ERROR`` ("raise" or "none"; default "none" for
  OpenRLHF, whose executor swallows exceptions, "raise" elsewhere) and ``TRL_POLAR_SCORE_TIMEOUT`` (seconds);
- ``TRL_POLAR_PROMPT_KEY`` (default "prompt"): the ``extra_info`` key holding the prompt (verl);
- ``TRL_POLAR_BATCH_WINDOW_MS`` (default 10): how long per-sample calls wait to be scored together.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from trl_polar.failures import FailurePolicy
from trl_polar.rewards import STRIP_THINK_DEFAULT

logger = logging.getLogger(__name__)
ENV_PREFIX = "TRL_POLAR_"
_KEYS = {
    "model": str,
    "url": str,
    "backend": str,
    "api_key": str,
    "device": str,
    "dtype": str,
    "max_tokens": int,
    "strip_think": bool,
    "wrapper": str,
    "baseline": bool,
    "clip": str,
    "sigmoid_scale": float,
    "on_error": str,
    "score_timeout": float,
    "prompt_key": str,
    "batch_window_ms": float,
}
_DEFAULTS = {
    "strip_think": STRIP_THINK_DEFAULT,
    "wrapper": "sft",
    "baseline": False,
    "dtype": "auto",
    "max_tokens": 16384,
    "prompt_key": "prompt",
    "batch_window_ms": 10.0,
}
_lock = threading.Lock()
_rewards: dict[tuple, Any] = {}


def _parse(key: str, value: Any, source: str) -> Any:
    kind = _KEYS[key]
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number", bool: "a boolean (1/0, true/false)"}.get(kind, "a string")
        raise ValueError(f"{source} must be {expected}, got {value!r}.") from None


def load_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The adapter settings: defaults, then the ``TRL_POLAR_CONFIG`` file, then ``TRL_POLAR_*`` variables."""
    environ = os.environ if environ is None else environ
    config = dict(_DEFAULTS)
    path = environ.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; the keys are {sorted(_KEYS)}.")
        config.update({k: _parse(k, v, f"{path}: {k!r}") for k, v in data.items()})
    for key in _KEYS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            config[key] = _parse(key, environ[name], name)
    if config.get("on_error") is not None or config.get("score_timeout") is not None:
        FailurePolicy(config.get("on_error") or "raise", config.get("score_timeout"))  # names a bad value now
    if not config.get("model") and not config.get("url"):
        raise ValueError(
            "No POLAR reward model configured: set TRL_POLAR_MODEL=/path/to/polar-rm (a model saved by trl-polar or "
            "converted with `trl-polar convert`) or TRL_POLAR_URL=http://host:port[,http://host2:port] (reward "
            "servers), or name `model` or `url` in the TRL_POLAR_CONFIG file."
        )
    return config


def _clip(text: str | None) -> Any:
    if text in (None, ""):
        return None
    parts = [float(p) for p in str(text).split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def policy(config: dict[str, Any], default_on_error: str = "raise") -> FailurePolicy:
    """The failure policy of an adapter: the configured one, or the adapter's default ``on_error``."""
    return FailurePolicy(config.get("on_error") or default_on_error, config.get("score_timeout"))


def get_reward(
    environ: dict[str, str] | None = None, *, on_error: str | None = None, config: dict | None = None
) -> Any:
    """The process-wide `PolarReward` for the current settings, built once (engines call from threads).

    ``on_error`` overrides the configured policy (the per-sample adapters score with "none" and apply the policy to
    each caller's own item)."""
    config = dict(load_config(environ) if config is None else config)
    if on_error is not None:
        config["on_error"] = on_error
    key = tuple(sorted((k, str(v)) for k, v in config.items()))
    with _lock:
        if key not in _rewards:
            import torch

            from trl_polar.rewards import PolarReward

            if config.get("url"):
                from trl_polar.serving.client import PolarClient

                # A comma-separated list is a set of replicas with failover.
                urls = [u.strip() for u in config["url"].split(",") if u.strip()]
                scorer = PolarClient(
                    urls=urls,
                    backend=config.get("backend") or "trl-polar",
                    api_key=config.get("api_key"),
                    wrapper=config["wrapper"],
                    template=config.get("model"),
                )
            else:
                from trl_polar.scorer import PolarScorer

                # Engines place their workers with Ray or torchrun, not accelerate: pick the device here, never from
                # accelerate's state, which would try to join the engine's process group.
                device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
                if not config.get("device") and device == "cpu":
                    # verl's reward-loop workers and TRL's async rollout workers hold no GPU: say so, once per model.
                    logger.warning(
                        "Scoring POLAR rewards on CPU: this process sees no GPU (verl's reward loop and TRL's async "
                        "rollout workers get none). Serve the model with `trl-polar serve --model %s` on a GPU and "
                        "set TRL_POLAR_URL=http://HOST:8000, or set TRL_POLAR_DEVICE=cpu to keep this.",
                        config["model"],
                    )
                scorer = PolarScorer(
                    config["model"], max_tokens_per_batch=config["max_tokens"], device=device, dtype=config["dtype"]
                )
            _rewards[key] = PolarReward(
                scorer,
                strip_think=config["strip_think"],
                wrapper=config["wrapper"],
                baseline=config["baseline"],
                clip=_clip(config.get("clip")),
                sigmoid_scale=config.get("sigmoid_scale"),
                on_missing_reference="error",
                on_error=config.get("on_error") or "raise",
                score_timeout=config.get("score_timeout"),
            )
        return _rewards[key]


def to_python(value: Any) -> Any:
    """Numpy arrays and scalars (how parquet columns arrive) as plain lists, dicts and numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_python(value.tolist())
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value
