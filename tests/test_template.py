"""PolarTemplate: the one POLAR input format, pinned branch by branch against the upstream rules."""

from __future__ import annotations

import pytest

from trl_polar.template import PolarTemplate, common_prefix_length, flatten

SEP, RTOK = "<|reward|>", "[UNUSED_TOKEN_130]"
P, R, C = "What is 2 + 2?", "4", "The answer is 4."


def ids(tok, text):
    """What upstream's final encode does: the joined text with add_special_tokens=True (BOS first)."""
    return tok.encode(text, add_special_tokens=True)


def part(tok, text):
    return tok.encode(text, add_special_tokens=True)


def text_of(tok, token_ids):
    return tok.decode(token_ids, skip_special_tokens=True)


def test_sft_text_and_ids(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer)
    expected_text = f"{P}\n{R}{SEP}{P}\n{C}"
    assert t.format(P, R, C) == expected_text + RTOK
    got = t.encode(P, R, C)
    assert got == ids(tiny_tokenizer, expected_text) + [t.reward_token_id]
    assert got[0] == tiny_tokenizer.bos_token_id
    assert got[-1] == tiny_tokenizer.convert_tokens_to_ids(RTOK)
    # A server tokenizing the client's text sees the same ids as training builds (non-empty responses).
    assert ids(tiny_tokenizer, t.format(P, R, C)) == got


def test_pretrain_wrapper_joins_without_newlines(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer)
    assert t.format(P, R, C, wrapper="pretrain") == f"{P}{R}{SEP}{P}{C}{RTOK}"
    assert t.encode(P, R, C, wrapper="pretrain") == ids(tiny_tokenizer, f"{P}{R}{SEP}{P}{C}") + [t.reward_token_id]


def test_message_lists_are_flattened_with_roles_dropped(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": P}]
    reference = [{"role": "assistant", "content": R}]
    candidate = [{"role": "assistant", "content": "Think."}, {"role": "assistant", "content": C}]
    assert t.format(prompt, reference, candidate) == t.format(f"Be brief.\n{P}", R, f"Think.\n{C}")
    assert t.encode(prompt, reference, candidate) == t.encode(f"Be brief.\n{P}", R, f"Think.\n{C}")
    assert "system" not in t.format(prompt, reference, candidate)


def test_empty_response_newline_client_quirk_and_training_rule(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer)
    # The official client always inserts "\n" (its emptiness check never fires) ...
    assert t.format(P, R, "") == f"{P}\n{R}{SEP}{P}\n{RTOK}"
    assert t.format(P, "", C) == f"{P}\n{SEP}{P}\n{C}{RTOK}"
    # ... while training drops the "\n" before an empty response.
    assert t.build(P, R, "").text == f"{P}\n{R}{SEP}{P}"
    assert t.build(P, "", C).text == f"{P}{SEP}{P}\n{C}"
    assert t.encode(P, R, "") == ids(tiny_tokenizer, f"{P}\n{R}{SEP}{P}") + [t.reward_token_id]


def test_unicode_survives_the_round_trip(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer)
    prompt, reference, candidate = "Traduis: 日本語 😀?", "«ça va» — ß", "中文 Ü 😀"
    assert t.format(prompt, reference, candidate) == f"{prompt}\n{reference}{SEP}{prompt}\n{candidate}{RTOK}"
    assert t.build(prompt, reference, candidate).truncated is False


# Upstream disagrees on the default cut side: POLAR's training code (xtuner's tokenize_ref) and its official client
# keep the first max_response_length tokens of a response ("right"), while xtuner's copy of that client defaults to
# "left" (the last tokens). The released checkpoints were trained on starts, and a score is only meaningful on input
# cut as in training, so "right" is the default everywhere, a decision these tests hold (docs/format.md, Truncation).
def test_default_cut_side_keeps_a_long_responses_start_as_in_training(tiny_tokenizer):
    from trl_polar import PolarConfig

    long_ref = " ".join(f"ref{i}" for i in range(40))
    long_cand = " ".join(f"cand{i}" for i in range(40))
    start = PolarTemplate(tiny_tokenizer, max_length=512, max_response_length=10, response_cut_side="right")
    end = PolarTemplate(tiny_tokenizer, max_length=512, max_response_length=10, response_cut_side="left")
    default = PolarTemplate(tiny_tokenizer, max_length=512, max_response_length=10)
    assert default.response_cut_side == "right" and default.to_dict()["response_cut_side"] == "right"
    assert default.build(P, long_ref, long_cand).text == start.build(P, long_ref, long_cand).text
    assert default.build(P, long_ref, long_cand).text != end.build(P, long_ref, long_cand).text
    assert "cand0" in default.build(P, long_ref, long_cand).text.split(SEP)[1]
    # Training holds the same default: the template a PolarConfig describes cuts as the scorer's does.
    config = PolarConfig(output_dir="unused", use_cpu=True, max_length=512, max_response_length=10)
    assert config.response_cut_side == "right"
    trained = PolarTemplate(tiny_tokenizer, **config.template_kwargs())
    assert trained.encode_pair(P, long_ref, long_cand, "x") == start.encode_pair(P, long_ref, long_cand, "x")


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_cut_sides(tiny_tokenizer, side):
    tok = tiny_tokenizer
    long_ref = " ".join(f"ref{i}" for i in range(40))
    long_cand = " ".join(f"cand{i}" for i in range(40))
    t = PolarTemplate(tok, max_length=512, max_response_length=10, response_cut_side=side)
    r_ids, c_ids = part(tok, long_ref), part(tok, long_cand)
    assert len(r_ids) > 10 and len(c_ids) > 10
    keep = (lambda x: x[:10]) if side == "right" else (lambda x: x[-10:])
    want_r, want_c = text_of(tok, keep(r_ids)), text_of(tok, keep(c_ids))
    enc = t.build(P, long_ref, long_cand)
    assert enc.text == f"{P}\n{want_r}{SEP}{P}\n{want_c}"
    assert enc.reference.original == len(r_ids) and enc.reference.kept == 10
    assert enc.candidate.kept == 10 and enc.prompt.truncated is False
    assert set(enc.truncation_report()) == {"reference", "candidate"}
    if side == "right":
        assert want_r.startswith("ref0") and not want_r.endswith("ref39")
    else:
        assert want_r.endswith("ref39") and not want_r.startswith("ref0")


def test_prompt_keeps_its_last_tokens_within_the_computed_budget(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = " ".join(f"word{i}" for i in range(60))
    max_length = 60
    t = PolarTemplate(tok, max_length=max_length, max_response_length=20)
    r_ids, c_ids, p_ids = part(tok, R), part(tok, C), part(tok, prompt)
    budget = (max_length - 4 - len(r_ids) - len(c_ids)) // 2
    assert len(p_ids) > budget > 0
    kept = text_of(tok, p_ids[-budget:])
    enc = t.build(prompt, R, C)
    assert enc.text == f"{kept}\n{R}{SEP}{kept}\n{C}"
    assert kept.endswith("word59") and "word0 " not in kept
    assert enc.prompt.original == len(p_ids) and enc.prompt.kept == budget
    assert enc.truncation_report() == {"prompt": {"original": len(p_ids), "kept": budget}}


def test_prompt_that_fits_is_untouched_at_the_exact_budget(tiny_tokenizer):
    tok = tiny_tokenizer
    r_ids, c_ids = part(tok, R), part(tok, C)
    prompt = "one two three four"
    p_len = len(part(tok, prompt))
    max_length = 4 + len(r_ids) + len(c_ids) + 2 * p_len  # budget // 2 == p_len exactly
    enc = PolarTemplate(tok, max_length=max_length).build(prompt, R, C)
    assert enc.prompt.truncated is False and enc.text.startswith(prompt + "\n")
    enc = PolarTemplate(tok, max_length=max_length - 2).build(prompt, R, C)  # one token fewer per copy
    assert enc.prompt.kept == p_len - 1


def test_encode_pair_uses_the_smaller_prompt_budget(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = " ".join(f"w{i}" for i in range(30))
    short, long_ = "ok", " ".join(f"x{i}" for i in range(12))
    t = PolarTemplate(tok, max_length=70, max_response_length=64)
    chosen_ids, rejected_ids = t.encode_pair(prompt, R, short, long_)
    r, s, lg, p = part(tok, R), part(tok, short), part(tok, long_), part(tok, prompt)
    budget = min((70 - 4 - len(r) - len(s)) // 2, (70 - 4 - len(r) - len(lg)) // 2)
    kept = text_of(tok, p[-budget:])
    assert chosen_ids == ids(tok, f"{kept}\n{R}{SEP}{kept}\n{short}") + [t.reward_token_id]
    assert rejected_ids == ids(tok, f"{kept}\n{R}{SEP}{kept}\n{long_}") + [t.reward_token_id]
    # Scored alone, the short candidate would keep more of the prompt: the pair really uses the minimum.
    assert len(t.encode(prompt, R, short)) > len(chosen_ids)
    # Both halves share the prefix up to the candidate, which shared-prefix batching relies on.
    assert common_prefix_length(chosen_ids, rejected_ids) >= len(ids(tok, f"{kept}\n{R}{SEP}{kept}")) - 1


def test_no_room_for_the_prompt_is_a_clear_error(tiny_tokenizer):
    t = PolarTemplate(tiny_tokenizer, max_length=24, max_response_length=10)
    long_ = " ".join(f"z{i}" for i in range(30))
    with pytest.raises(ValueError, match=r"No room left for the prompt: max_length=24 .* reference \(10 tokens\)"):
        t.encode(P, long_, long_)


@pytest.mark.parametrize(
    "args, match",
    [
        ((None, R, C), "`prompt` must be a string or a list of messages"),
        ((P, 42, C), "`reference` must be a string"),
        ((P, R, 3.5), "`candidate` must be a string"),
        ((P, R, [{"role": "assistant"}]), r"`candidate\[0\]` must be a message dict with a 'content' key"),
        ((P, [{"role": "assistant", "content": None}], C), r"`reference\[0\]\['content'\]` must be a string"),
        ((P, R, {"role": "assistant", "content": C}), "`candidate` must be a string or a list of messages"),
    ],
)
def test_bad_inputs_name_the_argument(tiny_tokenizer, args, match):
    with pytest.raises(ValueError, match=match):
        PolarTemplate(tiny_tokenizer).encode(*args)


def test_unknown_wrapper_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="`wrapper` must be one of"):
        PolarTemplate(tiny_tokenizer).format(P, R, C, wrapper="chat")


def test_bad_parameters_are_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="response_cut_side"):
        PolarTemplate(tiny_tokenizer, response_cut_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        PolarTemplate(tiny_tokenizer, max_length=4)
    with pytest.raises(ValueError, match="max_response_length"):
        PolarTemplate(tiny_tokenizer, max_response_length=0)
    with pytest.raises(ValueError, match="tokenizer"):
        PolarTemplate(None)


def test_tokenizer_without_polar_tokens_is_told_how_to_fix(plain_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    with pytest.raises(ValueError, match=r"no token '\[UNUSED_TOKEN_130\]' .*add_polar_tokens"):
        PolarTemplate(tok)


def test_special_tokens_inside_content_are_removed_as_upstream_does(tiny_tokenizer):
    # Parts are decoded with skip_special_tokens=True, so a reward token smuggled into a response cannot end it.
    t = PolarTemplate(tiny_tokenizer)
    enc = t.build(P, R, f"4 {RTOK} done")
    assert enc.text == f"{P}\n{R}{SEP}{P}\n4  done"
    assert enc.input_ids.count(t.reward_token_id) == 1


def test_from_pretrained_restores_the_recorded_template(tmp_path, tiny_tokenizer):
    from trl_polar.tiny import build_tiny_reward_model

    model = build_tiny_reward_model(tiny_tokenizer)
    from trl_polar.modeling import add_polar_tokens

    add_polar_tokens(tiny_tokenizer, model, max_length=2048, max_response_length=512, response_cut_side="left")
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    for source in (str(tmp_path), model):
        t = PolarTemplate.from_pretrained(source, tokenizer=tiny_tokenizer if source is model else None)
        assert t.to_dict() == {
            "max_length": 2048,
            "max_response_length": 512,
            "response_cut_side": "left",
            "separator": SEP,
            "reward_token": RTOK,
        }
        assert t.encode(P, R, C) == PolarTemplate(tiny_tokenizer).encode(P, R, C)


def test_realistic_fixture_tokenizer(shared_fixtures):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_fixtures / "bpe_tokenizer_with_bos")
    t = PolarTemplate(tok)
    assert t.reward_token_id == 1999 and tok.convert_tokens_to_ids(SEP) == 1998
    got = t.encode("How many 'r's are in the word 'strawberry'?", "3.", "There are three.")
    assert got[0] == 1 and got[-1] == 1999 and got.count(1998) == 1
    assert ids(tok, t.format("How many?", "3.", "Three.")) == t.encode("How many?", "3.", "Three.")


def test_flatten_and_common_prefix():
    assert flatten([{"content": "a"}, {"content": ""}, {"content": "b"}]) == "a\n\nb"
    assert flatten([]) == ""
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([5], [6]) == 0
    assert common_prefix_length() == 0


def test_content_parts_are_read_as_their_text(tiny_tokenizer, caplog):
    template = PolarTemplate(tiny_tokenizer)
    parts = [
        {"role": "assistant", "content": [{"type": "text", "text": "The answer "}, {"type": "text", "text": "4"}]}
    ]
    assert template.encode("2+2?", "4", parts) == template.encode("2+2?", "4", "The answer 4")
    # A message without any text part is not read, and is counted in the log.
    with caplog.at_level("WARNING", logger="trl_polar.template"):
        image_only = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        assert flatten([*image_only, {"role": "user", "content": "Hi"}]) == "Hi"
    assert "without any text part so far" in caplog.text
    with pytest.raises(ValueError, match=r"`prompt\[0\]\['content'\]\[0\]` must be a content part"):
        flatten([{"role": "user", "content": ["plain string part"]}], "prompt")
