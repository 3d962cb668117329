"""Preparing backbones as POLAR reward models and loading them ready to score."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trl_polar.hub import allow_remote_code, resolve_dtype
from trl_polar.modeling import add_polar_tokens, load_reward_model, prepare_reward_model, value_head
from trl_polar.template import PolarTemplate

P, R, C = "What is 2 + 2?", "4", "The answer is 4."


def score(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_add_polar_tokens_registers_tokens_resizes_and_records(plain_tokenizer_dir, tiny_qwen2_lm_dir):
    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_lm_dir)
    before = len(tok)
    assert "<|reward|>" not in tok.get_vocab()
    template = add_polar_tokens(tok, model, max_length=1024)
    assert len(tok) == before + 2
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.convert_tokens_to_ids("<|reward|>") == before and template.reward_token_id == before + 1
    assert tok.pad_token == "<pad>" and model.config.pad_token_id == tok.pad_token_id
    assert model.config.polar_template["max_length"] == 1024
    # Idempotent: a second call adds nothing.
    add_polar_tokens(tok, model)
    assert len(tok) == before + 2


def test_pad_token_is_created_and_never_the_reward_token(tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    add_polar_tokens(tiny_tokenizer)
    assert tiny_tokenizer.pad_token == tiny_tokenizer.eos_token
    tiny_tokenizer.pad_token = "[UNUSED_TOKEN_130]"
    tiny_tokenizer.eos_token = "[UNUSED_TOKEN_130]"
    add_polar_tokens(tiny_tokenizer)
    assert tiny_tokenizer.pad_token == "<|polar_pad|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_130]")


@pytest.mark.parametrize("lm_fixture", ["tiny_qwen2_lm_dir", "tiny_llama_lm_dir"])
def test_causal_lm_checkpoint_becomes_a_zero_headed_reward_model(request, tmp_path, lm_fixture):
    lm_dir = request.getfixturevalue(lm_fixture)
    model, tok = prepare_reward_model(lm_dir, template_kwargs={"max_length": 512})
    assert model.config.num_labels == 1
    assert torch.count_nonzero(value_head(model).weight) == 0
    template = PolarTemplate.from_pretrained(model, tokenizer=tok)
    assert template.max_length == 512
    assert score(model, template.encode(P, R, C)) == 0.0
    # The backbone weights came from the checkpoint, not a fresh init.
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    assert torch.equal(lm.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)

    # Saved, it is a plain AutoModelForSequenceClassification checkpoint that carries its template.
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert PolarTemplate.from_pretrained(tmp_path).encode(P, R, C) == template.encode(P, R, C)
    assert reloaded.config.polar_template == template.to_dict()


def test_zero_init_is_an_option(tiny_qwen2_lm_dir):
    model, _ = prepare_reward_model(tiny_qwen2_lm_dir, zero_init_head=False)
    assert torch.count_nonzero(value_head(model).weight) > 0


def test_trained_head_is_kept_when_loading_a_reward_model(tiny_qwen2_rm_dir):
    model, _ = prepare_reward_model(tiny_qwen2_rm_dir)
    original = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir)
    assert torch.equal(value_head(model).weight, value_head(original).weight)
    assert torch.count_nonzero(value_head(model).weight) > 0


@pytest.mark.parametrize("rm_fixture", ["tiny_qwen2_rm_dir", "tiny_llama_rm_dir"])
def test_standard_pooling_reads_the_reward_token_in_padded_batches(request, rm_fixture):
    model, template = load_reward_model(request.getfixturevalue(rm_fixture))
    assert not model.training
    seqs = [template.encode(P, R, C), template.encode(P, R, "No."), template.encode("Hi", "Hello there friend", "Hey")]
    singles = [score(model, s) for s in seqs]
    # The value head applied to the reward token's hidden state is the score.
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([seqs[0]])).last_hidden_state
        assert value_head(model)(hidden[0, -1]).item() == pytest.approx(singles[0], abs=1e-6)
    pad = template.tokenizer.pad_token_id
    width = max(map(len, seqs))
    for side in ("right", "left"):
        rows = [s + [pad] * (width - len(s)) if side == "right" else [pad] * (width - len(s)) + s for s in seqs]
        mask = [[int(t != pad) for t in row] for row in rows]
        with torch.no_grad():
            batch = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask)).logits[:, 0].tolist()
        assert batch == pytest.approx(singles, abs=1e-5)
    assert len({round(s, 6) for s in singles}) == 3


def test_load_reward_model_overrides_and_dtype(tiny_qwen2_rm_dir):
    model, template = load_reward_model(tiny_qwen2_rm_dir, dtype=torch.bfloat16, max_length=128)
    assert template.max_length == 128
    assert value_head(model).weight.dtype == torch.bfloat16


def test_one_dtype_mapping_for_every_entry_point(tiny_qwen2_lm_dir):
    for names, dtype in [(("bf16", "bfloat16"), torch.bfloat16), (("fp16", "float16"), torch.float16)]:
        assert [resolve_dtype(n) for n in names] == [dtype, dtype]
    assert resolve_dtype("fp32") == resolve_dtype("float32") == resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None) is None and resolve_dtype(torch.float16) == torch.float16
    accepted = "'auto', one of 'bf16', 'bfloat16', 'fp16', 'float16', 'fp32', 'float32' or a torch.dtype, got 'half'"
    with pytest.raises(ValueError, match=f"^`--dtype` must be {accepted}"):
        resolve_dtype("half", name="--dtype")
    # Training's loader takes the same names (TRL's model_init_kwargs once accepted only torch attribute names).
    model, _ = prepare_reward_model(tiny_qwen2_lm_dir, dtype="bf16")
    assert value_head(model).weight.dtype == torch.bfloat16


def test_one_remote_code_rule(tmp_path, tiny_qwen2_rm_dir):
    # A model's code runs only on request; a tokenizer that ships as code (an auto_map) runs it.
    assert not allow_remote_code(tiny_qwen2_rm_dir) and allow_remote_code(tiny_qwen2_rm_dir, True)
    assert not allow_remote_code(tiny_qwen2_rm_dir, tokenizer=True)
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer"]}}')
    assert allow_remote_code(tmp_path, tokenizer=True)


def test_a_model_directory_without_tokenizer_says_how_to_fix(tmp_path, tiny_qwen2_rm_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer files; pass `tokenizer=`"):
        load_reward_model(tmp_path)
    _, template = load_reward_model(tmp_path, tokenizer=tiny_qwen2_rm_dir)
    assert template.reward_token_id == AutoTokenizer.from_pretrained(tiny_qwen2_rm_dir).convert_tokens_to_ids(
        "[UNUSED_TOKEN_130]"
    )


def test_model_instance_must_be_a_one_label_classifier(tiny_qwen2_lm_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_qwen2_lm_dir)
    with pytest.raises(ValueError, match="one-label sequence-classification model"):
        prepare_reward_model(lm)


def test_peft_wrapped_head_is_found(tiny_qwen2_rm_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    head = value_head(peft_model)
    assert head.weight.requires_grad
    assert torch.equal(head.weight, value_head(model).weight)


def test_new_token_rows_start_at_the_mean_embedding(plain_tokenizer_dir, tiny_qwen2_lm_dir):
    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_lm_dir)
    rows = len(tok)
    inputs, outputs = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    add_polar_tokens(tok, model)
    for before, after in ((inputs, model.get_input_embeddings().weight), (outputs, model.lm_head.weight)):
        assert after.shape[0] == rows + 2
        assert torch.equal(after[:rows], before)
        # Both the separator's and the reward token's rows are the average of the old rows, in and out.
        assert torch.allclose(after[rows:], before.mean(dim=0).expand(2, -1), atol=1e-7)
    # A backbone turned into a reward model gets the same start (its input embeddings; the LM head is dropped).
    rm, rm_tok = prepare_reward_model(tiny_qwen2_lm_dir)
    new = rm.get_input_embeddings().weight[rows:]
    assert rm_tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]") == rows + 1
    assert torch.allclose(new, inputs.mean(dim=0).expand(2, -1), atol=1e-7)


def _official_tokenizer_without(tmp_path, shared_fixtures, drop: str, rename: str):
    """The official fixture's tokenizer with one added token renamed: built offline, same size, same other ids."""
    import json

    src = shared_fixtures / "bpe_tokenizer_with_bos"
    data = json.loads((src / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] == drop:
            token["content"] = rename
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [rename if t == drop else t for t in config["additional_special_tokens"]]
    out = tmp_path / f"without_{rename.strip('<|>[]')}"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert drop not in tokenizer.get_vocab() and len(tokenizer) == 2000
    return out


def test_official_checkpoint_never_gets_new_tokens(tmp_path, shared_fixtures, plain_tokenizer_dir):
    official = shared_fixtures / "internlm2_reward_tiny"
    # A tokenizer without the reward token: refused, naming the token and the id the head was trained to read.
    lacking = _official_tokenizer_without(tmp_path, shared_fixtures, "[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_131]")
    message = r"no single token '\[UNUSED_TOKEN_130\]', the reward token \(id 1999 in the checkpoint's vocabulary\)"
    for load in (load_reward_model, prepare_reward_model):
        with pytest.raises(ValueError, match=message):
            load(
                official,
                tokenizer=str(lacking) if load is load_reward_model else AutoTokenizer.from_pretrained(lacking),
            )
    # The reward token at another id (another model's vocabulary) is refused too, and nothing is added.
    other = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    other.add_special_tokens({"additional_special_tokens": ["<|reward|>", "[UNUSED_TOKEN_130]"]})
    size = len(other)
    with pytest.raises(
        ValueError, match=rf"maps the reward token '\[UNUSED_TOKEN_130\]' to id {size - 1}, .* id 1999"
    ):
        prepare_reward_model(official, other)
    assert len(other) == size

    # Upstream writes the separator as text and adds no token for it: a tokenizer that spells "<|reward|>" in
    # pieces scores as is, with the checkpoint's 2000 embedding rows untouched.
    pieces = _official_tokenizer_without(tmp_path, shared_fixtures, "<|reward|>", "<|other|>")
    model, template = load_reward_model(official, tokenizer=str(pieces))
    assert model.get_input_embeddings().num_embeddings == 2000 and len(template.tokenizer) == 2000
    ids = template.encode(P, R, C)
    assert ids[-1] == 1999 and 1998 not in ids
    assert template.tokenizer.decode(ids[1:-1]).count("<|reward|>") == 1


def test_a_trl_polar_checkpoint_refuses_a_tokenizer_without_its_tokens(tiny_qwen2_rm_dir, plain_tokenizer_dir):
    with pytest.raises(ValueError, match=r"no single token '\[UNUSED_TOKEN_130\]'.*never gets new tokens"):
        load_reward_model(tiny_qwen2_rm_dir, tokenizer=plain_tokenizer_dir)
    # Its own tokenizer loads unchanged.
    model, template = load_reward_model(tiny_qwen2_rm_dir)
    assert len(template.tokenizer) == model.get_input_embeddings().num_embeddings
