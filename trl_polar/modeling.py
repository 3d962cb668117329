"""Preparing any backbone as a POLAR reward model, and loading one ready to score.

A POLAR reward model here is a plain one-label `AutoModelForSequenceClassification` checkpoint whose tokenizer
knows the separator and the reward token, and whose config records the template it was trained with
(``config.polar_template``). Because the reward token is always the last real token of an input, the standard
last-token pooling of transformers, vLLM and SGLang reads the right place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .hub import load_classifier, load_tokenizer, resolve_dtype
from .template import CONFIG_KEY, DEFAULT_REWARD_TOKEN, DEFAULT_SEPARATOR, PolarTemplate

logger = logging.getLogger(__name__)

# Attribute names under which transformers' sequence-classification models keep their head.
_HEAD_NAMES = ("score", "classifier", "v_head")
FALLBACK_PAD_TOKEN = "<|polar_pad|>"


def add_polar_tokens(
    tokenizer: Any,
    model: Any = None,
    *,
    separator: str = DEFAULT_SEPARATOR,
    reward_token: str = DEFAULT_REWARD_TOKEN,
    **template_kwargs: Any,
) -> PolarTemplate:
    """Make a tokenizer (and model) ready for the POLAR format; return the template.

    - registers ``separator`` and ``reward_token`` as special tokens where the tokenizer lacks them;
    - makes sure a pad token exists and is not the reward token (the EOS token where possible);
    - resizes the model's embeddings to the tokenizer, sets ``config.pad_token_id`` and records the template
      parameters in ``config.polar_template``, so a saved checkpoint carries its template.

    Args:
        tokenizer: the tokenizer, changed in place.
        model: optional model, changed in place.
        separator, reward_token, template_kwargs: `PolarTemplate` parameters (max_length, max_response_length,
            response_cut_side).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (separator, reward_token) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.info("Registered POLAR special tokens %s.", missing)
    if tokenizer.pad_token is None or tokenizer.pad_token == reward_token:
        eos = tokenizer.eos_token
        if eos is not None and eos != reward_token:
            tokenizer.pad_token = eos
        else:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
        logger.info("Using %r as the pad token.", tokenizer.pad_token)
    template = PolarTemplate(tokenizer, separator=separator, reward_token=reward_token, **template_kwargs)
    if model is not None:
        embeddings = model.get_input_embeddings()
        if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.pad_token_id = tokenizer.pad_token_id
        setattr(model.config, CONFIG_KEY, template.to_dict())
    return template


def value_head(model: Any) -> torch.nn.Module:
    """The linear layer that maps the last hidden state to the reward."""
    # PEFT keeps the original model under `base_model.model` and wraps a trained head in `modules_to_save`.
    holders = [model, getattr(getattr(model, "base_model", None), "model", None)]
    for holder in holders:
        for name in _HEAD_NAMES:
            head = getattr(holder, name, None) if holder is not None else None
            if isinstance(head, torch.nn.Module):
                wrapped = getattr(head, "modules_to_save", None)
                return wrapped["default"] if wrapped is not None and "default" in wrapped else head
    raise ValueError(
        f"Cannot find the value head of {type(model).__name__} (looked for {_HEAD_NAMES}). "
        "Pass a one-label AutoModelForSequenceClassification model."
    )


def zero_init_value_head(model: Any) -> None:
    """Start the value head at zero, as upstream does for a new reward model: every input first scores 0."""
    head = value_head(model)
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()


def _load_classifier(path: str, **kwargs: Any) -> tuple[Any, bool]:
    """`trl_polar.hub.load_classifier`, and whether the value head is new (a causal-LM checkpoint has none)."""
    model, missing = load_classifier(path, **kwargs)
    return model, any(key.split(".")[0] in _HEAD_NAMES for key in missing)


def prepare_reward_model(
    model_or_path: Any,
    tokenizer: Any = None,
    *,
    zero_init_head: bool = True,
    separator: str = DEFAULT_SEPARATOR,
    reward_token: str = DEFAULT_REWARD_TOKEN,
    template_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Turn a model name, a path or a model into a POLAR reward model and its tokenizer.

    A causal-LM checkpoint becomes a one-label sequence-classification model (its LM head is dropped). When the
    value head is new, it starts at zero if ``zero_init_head``. The POLAR tokens are added where missing.

    Args:
        model_or_path: a hub name, a local directory, or a loaded one-label sequence-classification model.
        tokenizer: the tokenizer; loaded from the same place when omitted.
        zero_init_head: zero a newly created value head (upstream's choice).
        separator, reward_token, template_kwargs: template parameters recorded in the model's config.
        model_kwargs: passed to ``AutoModelForSequenceClassification.from_pretrained`` (``dtype``,
            ``trust_remote_code``, ...). A dtype name means what `trl_polar.hub.resolve_dtype` says, except "auto",
            which keeps transformers' meaning here (the checkpoint's own dtype), as TRL's ``model_init_kwargs`` do.

    Returns:
        ``(model, tokenizer)``.
    """
    fresh_head = False
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        dtype = model_kwargs.get("dtype")
        if dtype is not None and dtype != "auto":
            model_kwargs["dtype"] = resolve_dtype(dtype)
        model, fresh_head = _load_classifier(path, **model_kwargs)
        if tokenizer is None:
            tokenizer = load_tokenizer(path, trust_remote_code=model_kwargs.get("trust_remote_code", False))
    else:
        model = model_or_path
        if getattr(getattr(model, "config", None), "num_labels", None) != 1 or not _has_head(model):
            raise ValueError(
                f"`model` must be a one-label sequence-classification model, got {type(model).__name__}. Pass the "
                "model's name or path instead (a causal-LM checkpoint is converted automatically), or create it "
                "with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)."
            )
        if tokenizer is None:
            tokenizer = load_tokenizer(model.config._name_or_path)
    if fresh_head and zero_init_head:
        zero_init_value_head(model)
    from accelerate.utils import is_peft_model

    # A PEFT model cannot have its embeddings resized here: the tokens must already be in the tokenizer.
    target = None if is_peft_model(model) else model
    add_polar_tokens(tokenizer, target, separator=separator, reward_token=reward_token, **(template_kwargs or {}))
    return model, tokenizer


def _has_head(model: Any) -> bool:
    try:
        value_head(model)
    except ValueError:
        return False
    return True


def load_reward_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    **template_overrides: Any,
) -> tuple[Any, PolarTemplate]:
    """Load a POLAR reward model in eval mode with the template it was trained with, ready to score.

    Accepts checkpoints saved by trl_polar, official POLAR checkpoints (converted in memory, no remote code) and
    plain causal-LM checkpoints (with a warning: an untrained value head gives meaningless scores).

    Args:
        path: a local directory or a hub name.
        device, dtype: where and in which precision to put the model (dtype: see `trl_polar.hub.resolve_dtype`).
        tokenizer: a tokenizer (or its path) to use instead of the one stored with the model.
        trust_remote_code: allow remote code for checkpoints that need it (never for InternLM2: see
            `trl_polar.hub.allow_remote_code`).
        template_overrides: template parameters that replace the recorded ones.
    """
    path = str(path)
    dtype = resolve_dtype(dtype, device)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, fresh_head = _load_classifier(path, trust_remote_code=trust_remote_code, **kwargs)
    if fresh_head:
        logger.warning("%s has no trained value head: its scores are meaningless until it is trained.", path)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer) if tokenizer is not None else path, trust_remote_code)
    recorded = dict(getattr(model.config, CONFIG_KEY, None) or {})
    recorded.update(template_overrides)
    template = add_polar_tokens(tokenizer, model, **recorded)
    model.eval()
    if device is not None:
        model.to(device)
    return model, template
