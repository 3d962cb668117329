"""Loading from a directory or the Hugging Face hub: configs, tokenizers, checkpoints, and where and how to run them.

Everything that reads a model repository goes through here, so that three questions have one answer each:

- whether remote code runs (`allow_remote_code`);
- what a dtype name means (`resolve_dtype`);
- which device a process uses by default (`default_device`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Every dtype name trl_polar accepts (CLI flags, PolarScorer, load_reward_model, PolarConfig.model_init_kwargs).
DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# What a snapshot of an official checkpoint needs: config, weights, sentencepiece model and the tokenizer's code.
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.py"]


def read_config(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """config.json of a local directory or a hub repository, as a dict, without running any remote code."""
    config_file = os.path.join(path_or_name, "config.json")
    if not os.path.isfile(config_file):
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(str(path_or_name), "config.json")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def is_internlm2_checkpoint(path_or_name: str | os.PathLike) -> bool:
    """Whether a directory or hub repository holds an official InternLM2 checkpoint (which ships remote code)."""
    if os.path.isdir(path_or_name) and not os.path.isfile(os.path.join(path_or_name, "config.json")):
        return False
    try:
        return read_config(path_or_name).get("model_type") == "internlm2"
    except Exception:  # unreachable or unknown names: let from_pretrained raise its own, fuller error
        return False


def _tokenizer_is_code(source: str | os.PathLike) -> bool:
    config_file = os.path.join(source, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            return "auto_map" in json.load(f)
    # A hub name: of the checkpoints trl_polar knows, only InternLM2's tokenizer ships as code.
    return not os.path.isdir(source) and is_internlm2_checkpoint(source)


def allow_remote_code(source: str | os.PathLike, requested: bool = False, *, tokenizer: bool = False) -> bool:
    """The one rule deciding whether code shipped with a repository runs; every loader in trl_polar asks it.

    - The modeling code of an official InternLM2 checkpoint never runs: on transformers 5 it loads but scores
      wrongly (its rotary ``inv_freq`` buffer is left uninitialised), and `load_classifier` converts the checkpoint
      to a standard Llama reward model in memory instead, with identical scores. Asking for it raises.
    - A tokenizer that ships as code (its tokenizer_config.json has an ``auto_map``, as the released POLAR
      checkpoints' InternLM2 tokenizer does) runs it: it has no other implementation.
    - Anything else runs remote code only when the caller asked for it (``requested``: ``trust_remote_code=`` of
      `load_reward_model` and `prepare_reward_model`, or ``PolarConfig.trust_remote_code``).

    Args:
        source: a local directory or a hub name.
        requested: what the caller asked for.
        tokenizer: decide for the tokenizer of `source` rather than its model.
    """
    if tokenizer:
        return requested or _tokenizer_is_code(source)
    if requested and is_internlm2_checkpoint(source):
        raise ValueError(
            f"Refusing to run the remote code of {str(source)!r}: on transformers 5 it loads but gives wrong scores "
            "(its rotary inv_freq buffer is left uninitialised). Leave trust_remote_code off: trl_polar converts "
            "the checkpoint to a standard Llama reward model in memory, with identical scores."
        )
    return requested


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether a local directory holds tokenizer files (tokenizer*, vocab*, merges*, a SentencePiece *.model)."""
    names = os.listdir(directory)
    return any(name.startswith(("tokenizer", "vocab", "merges")) or name.endswith(".model") for name in names)


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained`, with remote code decided by `allow_remote_code`."""
    from transformers import AutoTokenizer

    if os.path.isdir(source) and not has_tokenizer_files(source):
        raise ValueError(f"{source} has no tokenizer files; pass `tokenizer=` (a tokenizer or its path or hub name).")
    remote = allow_remote_code(source, trust_remote_code, tokenizer=True)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=remote)


def local_snapshot(src: str | os.PathLike) -> Path:
    """`src` itself when it is a directory, else the files of hub repository `src` that a checkpoint needs."""
    if os.path.isdir(src):
        return Path(src)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src), allow_patterns=_SNAPSHOT_PATTERNS))


def checkpoint_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a local checkpoint directory, one shard at a time (safetensors or PyTorch .bin)."""
    shards = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not shards:
        raise FileNotFoundError(f"{src} holds no *.safetensors or pytorch_model*.bin weights.")
    for shard in shards:
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(shard, map_location="cpu", weights_only=True).items()


def resolve_dtype(value: Any, device: str | torch.device | None = None, *, name: str = "dtype") -> torch.dtype | None:
    """The one meaning of a dtype argument in trl_polar.

    Args:
        value: a ``torch.dtype``; None (keep the stored precision); "auto" (bfloat16 on a CUDA device that supports
            it, else float32); or a name: "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32".
        device: the device the model will run on, for "auto" (default: `default_device()`).
        name: the argument's name, for the error message (e.g. "--dtype").

    >>> resolve_dtype("bf16")
    torch.bfloat16
    >>> resolve_dtype("auto", "cpu")
    torch.float32
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        device = torch.device(device) if device is not None else default_device()
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if value not in DTYPE_NAMES:
        accepted = ", ".join(repr(n) for n in DTYPE_NAMES)
        raise ValueError(
            f"`{name}` must be 'auto', one of {accepted} or a torch.dtype, got {value!r}. "
            "'auto' is bfloat16 on a GPU that supports it and float32 elsewhere."
        )
    return DTYPE_NAMES[value]


def default_device() -> torch.device:
    """This process's device: its accelerate rank's device once accelerate is set up, else cuda:LOCAL_RANK or CPU.

    accelerate's state is only read, never created here: the first `PartialState()` of a process fixes its
    distributed type, and one created without ``cpu=True`` before the trainer's would make every CPU rank train alone.
    """
    from accelerate import PartialState

    if PartialState._shared_state != {}:
        return PartialState().device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")
