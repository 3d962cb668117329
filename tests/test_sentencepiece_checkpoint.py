"""A released-format checkpoint whose tokenizer ships as SentencePiece code converts and scores from the CLI.

The fixture has the layout of internlm/POLAR-7B at tiny size: InternLM2 reward-model weights, a config with an
``auto_map``, a SentencePiece ``tokenizer.model`` and a tokenizer module of our own (tests/data/internlm2_tokenizer)
with the same loading contract as the released one: remote code that imports `sentencepiece` at load time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from trl_polar import PolarScorer, PolarTemplate

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is a dependency of trl-polar; install it")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_CODE = ROOT / "tests" / "data" / "internlm2_tokenizer" / "tokenization_internlm2.py"
SEPARATOR, REWARD_TOKEN = "<|reward|>", "[UNUSED_TOKEN_130]"
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128
CORPUS = [
    f"{subject} {verb} {thing} number {n}."
    for n in range(40)
    for subject, verb, thing in [("The fox", "jumps over", "the dog"), ("A model", "scores", "an answer")]
] + ["What is 2 + 2? The answer is 4.", "Question: how many r's are in strawberry? Answer: three."]


def _sentencepiece_model(directory: Path) -> Path:
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=320,
        byte_fallback=True, user_defined_symbols=[SEPARATOR, REWARD_TOKEN], unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


def _internlm2_weights(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    head_dim = HIDDEN // HEADS

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    tensors = {"model.tok_embeddings.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "attention.wqkv.weight": w((HEADS + 2 * KV_HEADS) * head_dim, HIDDEN),
            p + "attention.wo.weight": w(HIDDEN, HIDDEN),
            p + "attention_norm.weight": 1 + w(HIDDEN),
            p + "feed_forward.w1.weight": w(FFN, HIDDEN),
            p + "feed_forward.w3.weight": w(FFN, HIDDEN),
            p + "feed_forward.w2.weight": w(HIDDEN, FFN),
            p + "ffn_norm.weight": 1 + w(HIDDEN),
        })  # fmt: skip
    tensors["v_head.weight"] = w(1, HIDDEN)
    return tensors


def write_sentencepiece_tokenizer(directory: Path):
    """A SentencePiece model and the tokenizer module that loads it, as the released checkpoints ship theirs."""
    sp = spm.SentencePieceProcessor(model_file=str(_sentencepiece_model(directory)))
    shutil.copy(TOKENIZER_CODE, directory / TOKENIZER_CODE.name)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
    }))  # fmt: skip
    return sp


@pytest.fixture(scope="module")
def sentencepiece_checkpoint(tmp_path_factory) -> Path:
    """An InternLM2-format POLAR checkpoint with a SentencePiece tokenizer that ships as code."""
    src = tmp_path_factory.mktemp("polar-sp")
    sp = write_sentencepiece_tokenizer(src)
    save_file(_internlm2_weights(sp.get_piece_size()), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForRewardModel"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForRewardModel"},
        "vocab_size": sp.get_piece_size(), "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 1e6,
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "reward_token_id": sp.piece_to_id(REWARD_TOKEN), "tie_word_embeddings": False, "dtype": "float32",
    }))  # fmt: skip
    return src


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_sentencepiece_is_a_dependency():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "sentencepiece" for d in dependencies)


def test_a_sentencepiece_code_tokenizer_checkpoint_converts_and_scores(sentencepiece_checkpoint, tmp_path):
    src = sentencepiece_checkpoint
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    _cli("convert", str(src), str(tmp_path / "polar"), cwd=tmp_path)
    out = tmp_path / "polar"
    assert (out / "tokenization_internlm2.py").is_file() and (out / "tokenizer.model").is_file()

    # The converted checkpoint's tokenizer is the SentencePiece code, BOS first, the POLAR tokens atomic.
    template = PolarTemplate.from_pretrained(str(out))
    assert type(template.tokenizer).__name__ == "InternLM2Tokenizer"
    text = "What is 2 + 2? The answer is 4."
    assert template.tokenizer.encode(text) == [1, *sp.encode(text)]
    assert template.reward_token_id == sp.piece_to_id(REWARD_TOKEN)

    rows = [
        {"prompt": "What is 2 + 2?", "reference": "The answer is 4.", "output": answer}
        for answer in ("The answer is 4.", "The fox jumps over the dog.", "four")
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli("score", "--model", str(out), "--data", "rows.jsonl", "--output", "scored.jsonl", cwd=tmp_path)
    scored = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]

    # Each reward is the converted model's logit on the template's tokens, ending in the reward token ...
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    for row, reward in zip(rows, scored):
        ids = template.build(row["prompt"], row["reference"], row["output"]).input_ids
        assert ids[0] == 1 and ids[-1] == template.reward_token_id
        with torch.no_grad():
            assert model(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(reward, abs=1e-4)
    # ... and the same as scoring the original checkpoint (converted in memory), with distinct values per answer.
    direct = PolarScorer(str(src), dtype="fp32", device="cpu").score(
        [r["prompt"] for r in rows], [r["reference"] for r in rows], [r["output"] for r in rows]
    )
    assert direct == pytest.approx(scored, abs=1e-4)
    assert len({round(s, 3) for s in scored}) == 3
