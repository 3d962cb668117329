"""Preparing any backbone as a POLAR reward model, and loading one ready to score.

A POLAR reward model here is a plain one-label `AutoModelForSequenceClassification` checkpoint whose tokenizer
knows the separator and the reward token, and whose config records the template it was trained with
(``config.polar_template``). Because the reward token is always the last real token of an input, the standard
last-token pooling of transformers, vLLM and SGLang reads the right place.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from .checkpoints import load_classifier
from .hub import load_tokenizer, resolve_dtype
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
    new_tokens: bool = True,
    **template_kwargs: Any,
) -> PolarTemplate:
    """Make a tokenizer (and model) ready for the POLAR format; return the template.

    - registers ``separator`` and ``reward_token`` as special tokens where the tokenizer lacks them; their new
      embedding rows start at the mean of the existing rows, as upstream initialises them;
    - makes sure a pad token exists and is not the reward token (the EOS token where possible);
    - resizes the model's embeddings to the tokenizer, sets ``config.pad_token_id`` and records the template
      parameters in ``config.polar_template``, so a saved checkpoint carries its template.

    Args:
        tokenizer: the tokenizer, changed in place.
        model: optional model, changed in place.
        separator, reward_token, template_kwargs: `PolarTemplate` parameters (max_length, max_response_length,
            response_cut_side).
        new_tokens: whether tokens may be added. `load_reward_model` and `prepare_reward_model` pass False for a
            trained POLAR checkpoint, after `check_checkpoint_tokens` has confirmed that its tokens are there.

    Example::

        tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B")
        model = AutoModelForSequenceClassification.from_pretrained("Qwen/Qwen3-0.6B", num_labels=1)
        template = add_polar_tokens(tokenizer, model, max_length=8192)
    """
    if new_tokens:
        vocab = tokenizer.get_vocab()
        missing = [t for t in (separator, reward_token) if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            logger.info("Registered POLAR special tokens %s.", missing)
    if tokenizer.pad_token is None or tokenizer.pad_token == reward_token:
        eos = tokenizer.eos_token
        if eos is not None and eos != reward_token:
            tokenizer.pad_token = eos
        elif new_tokens:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
        else:
            raise ValueError(
                f"The tokenizer has no pad token other than the reward token {reward_token!r} and no EOS token to pad "
                "with, and a trained checkpoint gets no new tokens. Set `tokenizer.pad_token` to an existing token."
            )
        logger.info("Using %r as the pad token.", tokenizer.pad_token)
    template = PolarTemplate(tokenizer, separator=separator, reward_token=reward_token, **template_kwargs)
    if model is not None:
        embeddings = model.get_input_embeddings()
        if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
            old_rows = embeddings.num_embeddings
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            init_new_embeddings(model, old_rows)
        model.config.pad_token_id = tokenizer.pad_token_id
        setattr(model.config, CONFIG_KEY, template.to_dict())
    return template


def _is_polar_checkpoint(config: Any) -> bool:
    """Whether a model config belongs to a trained POLAR reward model: one saved by trl_polar (it records its
    template) or an official InternLM2 POLAR checkpoint (it records ``reward_token_id``)."""
    return bool(getattr(config, CONFIG_KEY, None)) or getattr(config, "reward_token_id", None) is not None


def check_checkpoint_tokens(
    tokenizer: Any, config: Any, separator: str = DEFAULT_SEPARATOR, reward_token: str = DEFAULT_REWARD_TOKEN
) -> None:
    """Refuse a tokenizer that would need new tokens to score with a trained POLAR checkpoint.

    A new token would get an untrained embedding, and the scores would silently stop matching the checkpoint's.

    - The reward token must be one token the tokenizer has; when the config records ``reward_token_id`` (official
      checkpoints: ``[UNUSED_TOKEN_130]``, id 92527 in the InternLM2 vocabulary), it must be that id.
    - Official checkpoints were trained and are served with the separator written as text (``"<|reward|>"``) and
      encoded by their own tokenizer, whatever pieces that makes: nothing is added, as upstream adds nothing. A
      checkpoint saved by trl_polar had its separator registered as one token, so it must be one token.
    - The tokenizer must not hold more tokens than the checkpoint has embedding rows.

    Raises:
        ValueError: naming the token, the ids and the fix (load the tokenizer that ships with the checkpoint).

    Example::

        model = AutoModelForSequenceClassification.from_pretrained("./POLAR-7B-llama")
        check_checkpoint_tokens(AutoTokenizer.from_pretrained("./POLAR-7B-llama"), model.config)  # passes
    """
    name = getattr(config, "_name_or_path", None) or "this checkpoint"
    fix = (
        f"Use the tokenizer saved with {name} (omit `tokenizer=`), or one whose vocabulary matches it; a trained "
        "reward model never gets new tokens, which would start untrained and change every score."
    )
    vocab = tokenizer.get_vocab()
    expected = getattr(config, "reward_token_id", None)
    if reward_token not in vocab:
        where = f" (id {expected} in the checkpoint's vocabulary)" if expected is not None else ""
        raise ValueError(f"The tokenizer has no single token {reward_token!r}, the reward token{where}. {fix}")
    if expected is not None and vocab[reward_token] != expected:
        raise ValueError(
            f"The tokenizer maps the reward token {reward_token!r} to id {vocab[reward_token]}, but the checkpoint's "
            f"value head was trained to read id {expected} (config.reward_token_id). {fix}"
        )
    if expected is None and separator not in vocab:
        raise ValueError(
            f"The tokenizer has no single token {separator!r}, the separator this checkpoint was trained with. {fix}"
        )
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer holds {len(tokenizer)} tokens but the checkpoint has {rows} embedding rows. {fix}"
        )


def init_new_embeddings(model: Any, old_rows: int) -> None:
    """Set the embedding rows from ``old_rows`` on to the mean of the rows before them, as upstream does.

    A new token then starts as an average token instead of a random one, in the input embeddings and, when a model
    has untied output embeddings (a causal LM), in those too. Under DeepSpeed ZeRO-3 the weights are gathered first.
    `add_polar_tokens` calls it after resizing.

    Example::

        rows = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_embeddings(model, rows)
    """
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    gathered = contextlib.nullcontext()
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gathered, torch.no_grad():
        for weight in weights:
            if weight.shape[0] > old_rows > 0:
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)


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
    """`trl_polar.checkpoints.load_classifier`, and whether the value head is new (a causal-LM checkpoint has none)."""
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
    new_tokens = _allow_new_tokens(model, tokenizer, separator, reward_token)
    add_polar_tokens(
        tokenizer,
        target,
        separator=separator,
        reward_token=reward_token,
        new_tokens=new_tokens,
        **(template_kwargs or {}),
    )
    return model, tokenizer


def _allow_new_tokens(model: Any, tokenizer: Any, separator: str, reward_token: str) -> bool:
    """False, after checking its tokens, for a trained POLAR checkpoint, which never gets new tokens."""
    if not _is_polar_checkpoint(model.config):
        return True
    check_checkpoint_tokens(tokenizer, model.config, separator, reward_token)
    return False


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
    plain causal-LM checkpoints (with a warning: an untrained value head gives meaningless scores). A trained POLAR
    checkpoint never gets new tokens: a tokenizer that lacks its reward token (or maps it to another id than
    ``config.reward_token_id``) is refused (`check_checkpoint_tokens`).

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
    separator = recorded.pop("separator", DEFAULT_SEPARATOR)
    reward_token = recorded.pop("reward_token", DEFAULT_REWARD_TOKEN)
    new_tokens = _allow_new_tokens(model, tokenizer, separator, reward_token)
    template = add_polar_tokens(
        tokenizer, model, separator=separator, reward_token=reward_token, new_tokens=new_tokens, **recorded
    )
    model.eval()
    if device is not None:
        model.to(device)
    return model, template
