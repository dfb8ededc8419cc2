from pathlib import Path

import pytest

from lawtune.data import Record
from lawtune.prompts import (
    CHAT_INSTRUCTION,
    PLAIN_TEMPLATE,
    encode_example,
    render_example,
    render_prompt,
)

RECORD = Record(id="1_1", statement="甲将乙打伤，下列哪些说法正确？",
                options={"A": "甲构成故意伤害罪", "B": "乙可以请求赔偿", "C": "甲无需担责", "D": "乙应自担损失"}, answer=["A", "B"])
# How format_question lays out RECORD: the statement, then one "X. text" line per option.
QUESTION = ("甲将乙打伤，下列哪些说法正确？\nA. 甲构成故意伤害罪\nB. 乙可以请求赔偿\nC. 甲无需担责\nD. 乙应自担损失")
REASONED = Record(**{**RECORD.__dict__, "reasoning": "甲故意伤害他人身体，A正确；乙有权请求侵权赔偿，B正确。"})


def test_instruction_says_several_options_may_be_correct():
    assert "一个或多个" in CHAT_INSTRUCTION


def test_plain_template_is_the_original_recipe_verbatim(tiny_tokenizer):
    prompt = render_prompt(RECORD, tiny_tokenizer, "plain")
    expected = ("请你作为一位法律专家,分析下面的法律问题并给出你认为正确的答案。请先思考分析题目,然后从选项中选择一个最合适的答案。\n\n"
                "### 问题:\n" + QUESTION + "\n\n### 回应:\n<think>\n\n</think>\n")
    assert prompt == tiny_tokenizer.bos_token + expected
    assert PLAIN_TEMPLATE.endswith("### 回应:\n<think>\n")


def test_chat_training_text_is_exactly_the_inference_prompt(real_tokenizer):
    """The real R1-Distill template: the trained prompt equals the generation prompt plus an empty think block."""
    user = CHAT_INSTRUCTION + "\n\n" + QUESTION
    generation_prompt = real_tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                           add_generation_prompt=True)
    assert generation_prompt.endswith("<｜Assistant｜><think>\n")
    prompt, target = render_example(RECORD, real_tokenizer, "chat")
    assert prompt == generation_prompt + "\n</think>\n\n"
    assert target == "答案：AB"
    enc = encode_example(RECORD, real_tokenizer, "chat", 2048)
    inference_ids = real_tokenizer(render_prompt(RECORD, real_tokenizer, "chat"), add_special_tokens=False)["input_ids"]
    n = len(inference_ids)
    assert enc.input_ids[:n] == inference_ids
    assert enc.input_ids[0] == 151646  # bos, once
    assert enc.input_ids.count(151646) == 1
    assert 151648 in inference_ids and 151649 in inference_ids  # <think> and </think> as single tokens
    assert real_tokenizer.decode(enc.input_ids[n:]) == "答案：AB<｜end▁of▁sentence｜>"


def test_reasoning_is_trained_inside_the_think_block_that_the_template_would_drop(real_tokenizer):
    prompt, target = render_example(REASONED, real_tokenizer, "chat")
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert target == REASONED.reasoning + "\n</think>\n\n答案：AB"
    # Why lawtune renders the assistant turn itself: the template keeps only what follows </think>.
    via_template = real_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n" + target}], tokenize=False)
    assert REASONED.reasoning not in via_template
    enc = encode_example(REASONED, real_tokenizer, "chat", 2048)
    trained = real_tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert trained == target + "<｜end▁of▁sentence｜>"


def test_only_answer_and_end_token_carry_loss_and_eos_is_learned(tiny_tokenizer):
    enc = encode_example(RECORD, tiny_tokenizer, "chat", 512)
    assert len(enc.input_ids) == len(enc.labels)
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tiny_tokenizer.decode(labelled) == "答案：AB" + tiny_tokenizer.eos_token
    assert enc.labels[-1] == tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id
    first = next(i for i, lab in enumerate(enc.labels) if lab != -100)
    assert all(lab == -100 for lab in enc.labels[:first]) and all(lab != -100 for lab in enc.labels[first:])


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_overlong_examples_are_cut_in_the_question_never_the_answer(tiny_tokenizer, fmt):
    long = Record(**{**RECORD.__dict__, "statement": "甲乙之间的合同纠纷事实经过如下，" * 200 + "下列哪些说法正确？"})
    full = encode_example(long, tiny_tokenizer, fmt, 100_000)
    enc = encode_example(long, tiny_tokenizer, fmt, 256)
    assert not full.truncated and len(full.input_ids) > 256
    assert enc.truncated and len(enc.input_ids) <= 256
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tiny_tokenizer.decode(labelled) == "答案：AB" + tiny_tokenizer.eos_token
    text = tiny_tokenizer.decode(enc.input_ids)
    assert "D. 乙应自担损失" in text  # options survive; only the statement was shortened


def test_example_that_cannot_fit_is_refused(tiny_tokenizer):
    huge_options = Record(**{**RECORD.__dict__, "options": {k: "很长的选项" * 100 for k in "ABCD"}})
    assert encode_example(huge_options, tiny_tokenizer, "chat", 64) is None


def test_the_real_tokenizer_is_also_taken_from_lawtune_tokenizer(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import SHARED, TOKENIZER_ENV, real_tokenizer_dir

    monkeypatch.setenv(TOKENIZER_ENV, str(tiny_model_dir))
    assert real_tokenizer_dir() == Path(tiny_model_dir)
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path))  # named, but no tokenizer there: said, not skipped
    with pytest.raises(pytest.fail.Exception, match=f"{TOKENIZER_ENV}=.*no tokenizer_config.json"):
        real_tokenizer_dir()
    monkeypatch.delenv(TOKENIZER_ENV)
    assert real_tokenizer_dir() == (SHARED if (SHARED / "tokenizer_config.json").is_file() else None)
