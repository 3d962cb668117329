"""Tiny tokenizers and models built offline, for tests, the quickstart and benchmarks.

Everything here is built from scratch on the local machine: no hub access. The tokenizer is a byte-level BPE
(so it round-trips any text through `AutoTokenizer`) with BOS/EOS/pad and the POLAR tokens registered.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .template import DEFAULT_REWARD_TOKEN, DEFAULT_SEPARATOR

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# The pre-tokenisation pattern of Qwen2's tokenizer (a format fact: contractions, letters, single digits, ...).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2 + 2? The answer is 4. Let me think step by step.",
    "Translate to French: good morning -> bonjour.",
    "def add(a, b):\n    return a + b\n",
    "A reward model scores how close a candidate answer is to a reference answer.",
    "Policies differ in style, length and accuracy; a discriminator learns to tell them apart.",
    "1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
    "Question: how many r's are in strawberry? Answer: three.",
    "ÄÖÜ ß é è — “quotes” 中文 日本語 😀",
]


def build_tiny_tokenizer(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
    polar_tokens: bool = True,
):
    """A byte-level BPE fast tokenizer with BOS ``<s>`` prepended, EOS ``</s>``, pad ``<pad>``.

    With ``polar_tokens`` the separator ``<|reward|>`` and the reward token ``[UNUSED_TOKEN_130]`` are registered
    special tokens. Saved to ``out_dir`` when given (it then reloads with ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    model = Tokenizer(models.BPE(unk_token=None))
    # transformers rebuilds a tokenizer saved next to a qwen2 config as Qwen2Tokenizer, keeping only the vocab
    # and merges; building it with that class's normaliser and pre-tokeniser makes the reload encode identically.
    model.normalizer = normalizers.NFC()
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else _DEFAULT_CORPUS * 4
    model.train_from_iterator(texts, trainer=trainer)
    bos_id = model.token_to_id(BOS)
    model.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    if polar_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_SEPARATOR, DEFAULT_REWARD_TOKEN]})
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def tiny_config(tokenizer, arch: str = "qwen2", **overrides):
    """A small `Qwen2Config` or `LlamaConfig` sized to the tokenizer (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, Qwen2Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"`arch` must be one of {sorted(classes)}, got {arch!r}.")
    params = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    params.update(overrides)
    return classes[arch](**params)


def build_tiny_causal_lm(tokenizer, arch: str = "qwen2", seed: int = 0, out_dir=None, **overrides):
    """A randomly initialised tiny causal LM (a policy, or a backbone to turn into a reward model)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, arch, **overrides))
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


def build_tiny_reward_model(tokenizer, arch: str = "qwen2", seed: int = 0, out_dir=None, **overrides):
    """A randomly initialised tiny POLAR reward model: one-label sequence classification, tokens registered.

    The head is left random (not zero) so that scores differ between inputs, which is what tests need.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from .modeling import add_polar_tokens

    torch.manual_seed(seed)
    config = tiny_config(tokenizer, arch, num_labels=1, **overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    add_polar_tokens(tokenizer, model)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


def build_tiny_policy_pool(
    tokenizer,
    out_dir,
    num_policies: int = 4,
    seed: int = 0,
    first: int = 0,
    habit: float = 2.0,
    favourites: int = 0,
    boost: float = 4.0,
    **overrides,
) -> list[str]:
    """Tiny causal LMs that share one vocabulary and write with habits of their own: a policy pool for demos and tests.

    Random weights alone give every policy near-uniform gibberish, which no discriminator can tell apart and no policy
    can learn to imitate. So each policy gets a habit (see `give_habits`): a preference of its own over the shared
    tokens. A discriminator can then learn what POLAR learns at scale
    (whether a candidate comes from the reference's policy), and RL can move one policy towards another's habits.
    Random preferences alone overlap by chance: a policy may already favour many of another's tokens, and then
    moving away from itself in any direction looks like moving towards the other. With ``favourites`` > 0 each
    policy also strongly prefers a set of that many tokens of its own (their logits raised by ``boost``), and no two
    policies' sets overlap, so that writing more like policy ``k`` means using more of policy ``k``'s set (docs/rl.md
    reports what that does to the quickstart's GRPO stage; the default keeps random preferences only).
    Policy ``k`` depends only on ``seed`` and ``k``: ``first=4`` builds policies 4, 5, ... that a pool of four never
    contains (held-out targets). Only tokens that survive the trip to text are written (answers are stored as text,
    and a lone byte of a multi-byte character decodes to U+FFFD, the same text for every policy).

    Returns:
        The saved policy directories, ``out_dir/policy_<k>`` (model, tokenizer and generation config each).
    """
    import random
    from pathlib import Path

    special = set(tokenizer.all_special_ids)
    allowed = [i for i in range(len(tokenizer)) if i not in special and _round_trips(tokenizer, i)]
    suppress = sorted(set(range(len(tokenizer))) - set(allowed) - {tokenizer.eos_token_id})
    # One shuffle per seed, cut into consecutive sets: policy k's set is the same in every pool built with this seed.
    random.Random(seed).shuffle(allowed)
    if (first + num_policies) * favourites > len(allowed) // 2:
        raise ValueError(
            f"{first + num_policies} policies x {favourites} favourite tokens leave fewer than half of the "
            f"{len(allowed)} writable tokens shared; lower `favourites` or build a larger tokenizer."
        )
    paths = []
    for k in range(first, first + num_policies):
        model = build_tiny_causal_lm(tokenizer, seed=seed * 1000 + k, **overrides)
        own = allowed[k * favourites : (k + 1) * favourites]
        give_habits(model, seed * 1000 + k, habit, tokenizer.eos_token_id, favourites=own, boost=boost)
        model.generation_config.suppress_tokens = suppress
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        path = Path(out_dir) / f"policy_{k}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def give_habits(
    model,
    seed: int,
    strength: float = 2.0,
    eos_token_id: int | None = None,
    favourites: Iterable[int] = (),
    boost: float = 0.0,
) -> None:
    """Write a token preference of its own into a tiny random causal LM's weights, in place.

    The habit lives in the weights (not in a logits processor) so that sampling, GRPO's log-probabilities and a
    target's log-likelihood all see the same distribution, and training can change it. Hidden channel 0 of every
    token embedding is set to a constant that dominates the final norm's input, so the output head's column 0 acts
    as a per-token bias: ``strength`` x a standard normal draw per token, plus ``boost`` for the ``favourites``
    token ids. EOS gets the same odds in every policy
    (about 1 in 40 per token), so answers run to a few dozen tokens and a policy is told apart by what it writes.
    The random rest of the head keeps a weak dependence on the context.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        vocab, hidden = embed.shape
        channel = 2.0 * embed[:, 1:].std().item() * (hidden - 1) ** 0.5  # twice the norm of the other channels
        embed[:, 0] = channel
        level = channel / ((channel**2 + embed[:, 1:].pow(2).sum(-1).mean().item()) / hidden) ** 0.5
        bias = strength * torch.randn(vocab, generator=generator)
        bias[list(favourites)] += boost
        if eos_token_id is not None:
            others = torch.cat([bias[:eos_token_id], bias[eos_token_id + 1 :]])
            bias[eos_token_id] = torch.logsumexp(others, 0) - 3.7
        head[:, 0] = bias / level


def _round_trips(tokenizer, token_id: int) -> bool:
    """Whether a token decodes to text that encodes back to that one token."""
    text = tokenizer.decode([token_id])
    return "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) == [token_id]
