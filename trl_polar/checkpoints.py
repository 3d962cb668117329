"""Official POLAR checkpoints (InternLM2ForRewardModel, remote code) -> standard transformers checkpoints.

The released checkpoints (internlm/POLAR-1_8B, POLAR-7B and their -Base variants) ship InternLM2 modeling code
that loads on transformers 5.x but scores wrongly: its rotary ``inv_freq`` buffer is left uninitialised by
``from_pretrained``. InternLM2 is architecturally a Llama (RMSNorm, rotary embeddings with dynamic NTK scaling,
grouped-query attention, SwiGLU), so the weights map one to one onto ``LlamaForSequenceClassification`` with one
label, which transformers, vLLM and SGLang load without remote code:

    model.tok_embeddings            -> model.embed_tokens
    layers.N.attention.wqkv         -> layers.N.self_attn.{q,k,v}_proj   (InternLM2 interleaves them per KV group)
    layers.N.attention.wo           -> layers.N.self_attn.o_proj
    layers.N.feed_forward.w1/w3/w2  -> layers.N.mlp.gate_proj/up_proj/down_proj
    layers.N.attention_norm         -> layers.N.input_layernorm
    layers.N.ffn_norm               -> layers.N.post_attention_layernorm
    model.norm                      -> model.norm
    v_head                          -> score

`load_classifier` loads a reward model of either kind: an official checkpoint through this conversion, any other
through ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .hub import (
    allow_remote_code,
    checkpoint_tensors,
    is_internlm2_checkpoint,
    load_tokenizer,
    local_snapshot,
    read_config,
)
from .template import CONFIG_KEY, DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_LENGTH, DEFAULT_SEPARATOR, PolarTemplate

logger = logging.getLogger(__name__)

# The reward token of the released checkpoints (InternLM2 vocabulary id 92527).
INTERNLM2_REWARD_TOKEN = "[UNUSED_TOKEN_130]"
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|.*\.model|tokenization_.*\.py|added_tokens\.json)$"
)
_RENAMES = [
    (re.compile(r"^model\.tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^model\.norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^v_head\.weight$"), "score.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attention\.wo\.weight$"), r"model.layers.\1.self_attn.o_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w1\.weight$"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w3\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w2\.weight$"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attention_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
]
_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.weight$")


def llama_config_from_internlm2(config: dict[str, Any]):
    """The `LlamaConfig` (one label) equivalent to an InternLM2 reward-model config.json."""
    from transformers import LlamaConfig

    if config.get("model_type") != "internlm2":
        raise ValueError(f"Expected an InternLM2 config (model_type 'internlm2'), got {config.get('model_type')!r}.")
    if config.get("bias", False):
        raise ValueError("InternLM2 checkpoints with attention/MLP biases are not supported (config 'bias': true).")
    if config.get("pretraining_tp", 1) != 1:
        logger.info(
            "Ignoring pretraining_tp=%s: it only splits matmuls and does not change results.", config["pretraining_tp"]
        )
    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling") or {}
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ValueError(
                f"Unsupported InternLM2 rope_scaling {scaling!r}: only 'dynamic' and 'linear' map exactly."
            )
        rope.update({"rope_type": kind, "factor": float(scaling["factor"])})
    reward_token_id = config.get("reward_token_id")
    llama = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        num_labels=1,
        architectures=["LlamaForSequenceClassification"],
    )
    llama.reward_token_id = reward_token_id
    setattr(
        llama,
        CONFIG_KEY,
        {
            "max_length": DEFAULT_MAX_LENGTH,
            "max_response_length": DEFAULT_MAX_RESPONSE_LENGTH,
            "response_cut_side": "right",
            "separator": DEFAULT_SEPARATOR,
            "reward_token": INTERNLM2_REWARD_TOKEN,
        },
    )
    return llama


def split_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused q/k/v weight into Llama's q_proj, k_proj and v_proj weights.

    InternLM2 stores, for each KV head, its ``num_heads // num_kv_heads`` query heads followed by its key head and
    its value head. Query head ``h * groups + g`` then uses KV head ``h``, which is Llama's grouped-query order.
    """
    groups = num_heads // num_kv_heads
    hidden = wqkv.shape[-1]
    head_dim = wqkv.shape[0] // (num_kv_heads * (groups + 2))
    if head_dim * num_kv_heads * (groups + 2) != wqkv.shape[0]:
        raise ValueError(
            f"wqkv has {wqkv.shape[0]} rows, not a multiple of num_key_value_heads * (groups + 2) = "
            f"{num_kv_heads * (groups + 2)}: the config does not match the weights."
        )
    blocks = wqkv.reshape(num_kv_heads, groups + 2, head_dim, hidden)
    q = blocks[:, :groups].reshape(num_heads * head_dim, hidden)
    k = blocks[:, groups].reshape(num_kv_heads * head_dim, hidden)
    v = blocks[:, groups + 1].reshape(num_kv_heads * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], num_heads: int, num_kv_heads: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and split) InternLM2 reward-model tensors to Llama sequence-classification names, lazily."""
    for name, tensor in tensors:
        match = _WQKV.match(name)
        if match:
            layer = match.group(1)
            q, k, v = split_wqkv(tensor, num_heads, num_kv_heads)
            yield f"model.layers.{layer}.self_attn.q_proj.weight", q
            yield f"model.layers.{layer}.self_attn.k_proj.weight", k
            yield f"model.layers.{layer}.self_attn.v_proj.weight", v
            continue
        for pattern, target in _RENAMES:
            if pattern.match(name):
                yield pattern.sub(target, name), tensor
                break
        else:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config; it is exactly the buffer that breaks remote loading
            raise ValueError(
                f"Unexpected tensor {name!r} in the InternLM2 checkpoint: this converter knows the reward-model "
                "layout (tok_embeddings, layers.N.attention.wqkv/wo, feed_forward.w1/w2/w3, norms, v_head)."
            )


def load_internlm2_reward_model(src: str | os.PathLike, dtype: torch.dtype | None = None):
    """Build the equivalent `LlamaForSequenceClassification` of an official POLAR checkpoint, in memory.

    No remote code runs. ``dtype`` defaults to the checkpoint's own (fp16/bf16 for the released models).
    """
    from transformers import LlamaForSequenceClassification

    path = local_snapshot(src)
    internlm2 = read_config(path)
    config = llama_config_from_internlm2(internlm2)
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = dict(convert_tensors(checkpoint_tensors(path), num_heads, num_kv_heads))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"Conversion left missing weights {missing} and unexpected weights {unexpected}.")
    # Non-persistent buffers (rotary inv_freq) stayed on the meta device: rebuild them from the config.
    rotary = type(model.model.rotary_emb)(config=config)
    model.model.rotary_emb = rotary
    model.config.name_or_path = str(src)
    return model.to(dtype).eval()


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an official POLAR checkpoint as a standard transformers checkpoint in `out`.

    The tokenizer is carried over from ``tokenizer`` (a path or hub name) or from ``src``. InternLM2's tokenizer is
    itself remote code: its files are copied as they are, and `trl_polar.hub.allow_remote_code` trusts a tokenizer
    shipped as code.

    Returns:
        The output directory.
    """
    out = Path(out)
    model = load_internlm2_reward_model(src, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok_src = local_snapshot(tokenizer if tokenizer is not None else src)
    copied = []
    for file in sorted(tok_src.iterdir()):
        if file.is_file() and _TOKENIZER_FILES.match(file.name):
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    if not copied:
        logger.warning(
            "No tokenizer files found in %s: pass `tokenizer=` so that PolarTemplate.from_pretrained(%s) works.",
            tok_src,
            out,
        )
    _check_tokenizer(out)
    return out


def _check_tokenizer(out: Path) -> None:
    """The converted directory must give back a template whose reward token is the config's reward token id."""
    config = read_config(out)
    if not any(out.glob("tokenizer*")):
        return
    tokenizer = load_tokenizer(out)
    template = PolarTemplate(tokenizer, **config[CONFIG_KEY])
    expected = config.get("reward_token_id")
    if expected is not None and template.reward_token_id != expected:
        raise ValueError(
            f"The tokenizer maps {template.reward_token!r} to id {template.reward_token_id}, but the checkpoint's "
            f"reward_token_id is {expected}: this tokenizer does not belong to this checkpoint."
        )


def load_classifier(path: str | os.PathLike, trust_remote_code: bool = False, **kwargs: Any):
    """A one-label sequence-classification model from `path`, and the weights its checkpoint lacked.

    Official InternLM2 checkpoints are converted in memory (`load_internlm2_reward_model`) instead of running their
    remote code. ``kwargs`` go to ``AutoModelForSequenceClassification.from_pretrained`` (``dtype``, ...).

    Returns:
        ``(model, missing_keys)``.
    """
    from transformers import AutoModelForSequenceClassification

    remote = allow_remote_code(path, trust_remote_code)
    if is_internlm2_checkpoint(path):
        # transformers' "auto" means the checkpoint's own dtype, which is what the converter keeps by default.
        dtype = kwargs.get("dtype")
        return load_internlm2_reward_model(path, dtype=None if dtype == "auto" else dtype), []
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, output_loading_info=True, trust_remote_code=remote, **kwargs
    )
    return model, list(info.get("missing_keys", ()))
