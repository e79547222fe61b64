import json
import logging
import random
from pathlib import Path

import pytest

from models.llm import ChatText
from prompting import (SPEECH_SLOT, SPEECH_TAG, PromptError, TurnText, choose_prompt, conversation, expand_turns,
                       fill_question, load_prompts, prompt_key, question_messages)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "USER: {}\nASSISTANT:"
VICUNA = ChatText(ROOT / "tests/parity/llama_dir", prompt_template=TEMPLATE)  # no chat template: the plain wrap
DIALOGUE_TASKS = ("emotional_trajectory", "emotional_reasoning", "empathy")


def write_prompts(tmp_path: Path, prompts: dict) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_each_prompt_is_wrapped_once_when_rendered_and_keeps_its_own_braces(tmp_path):
    path = write_prompts(tmp_path, {"QA": [f"{SPEECH_TAG} {{}}"], "asr": [f"{SPEECH_TAG} Transcribe.",
                                                                          f"{SPEECH_TAG} Write it down."]})
    prompts = load_prompts(path)
    assert prompts["QA"] == [f"{SPEECH_TAG} {{}}"]  # the user's message; the LLM's template comes at tokenising
    assert VICUNA.render(conversation(prompts["QA"][0], None, "en", False)) == f"USER: {SPEECH_TAG} {{}}\nASSISTANT:"
    for prompt in prompts["asr"]:
        rendered = VICUNA.render(conversation(prompt, None, "en", False))
        assert rendered.count("USER:") == 1 and rendered.count("ASSISTANT:") == 1
        assert "{}" not in rendered


def test_prompt_without_speech_slot_is_dropped_with_a_warning_naming_task_and_prompt(tmp_path, caplog):
    path = write_prompts(tmp_path, {"emotion_recognition": [f"{SPEECH_TAG} One word.", "No tag here."],
                                    "text_only": ["Only text."]})
    with caplog.at_level(logging.WARNING, logger="prompting"):
        prompts = load_prompts(path)
    assert prompts == {"emotion_recognition": [f"{SPEECH_TAG} One word."]}
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "'emotion_recognition'" in warnings and "No tag here." in warnings
    assert "'text_only'" in warnings


def test_missing_prompt_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_prompts(str(tmp_path / "nowhere.json"))


def test_template_needs_exactly_one_slot_and_wraps_one_user_message():
    user = [{"role": "user", "content": "x"}]
    for bad in ("USER: {} and {}", "USER:"):
        with pytest.raises(ValueError, match="exactly one"):
            ChatText(ROOT / "tests/parity/llama_dir", prompt_template=bad).render(user)
    with pytest.raises(ValueError, match="one user message"):
        VICUNA.render(user + [{"role": "assistant", "content": "y"}] + user)
    with_system = ChatText(ROOT / "tests/parity/llama_dir", system_prompt="Be brief.")
    assert with_system.render(user) == "Be brief. USER: x\nASSISTANT:"


def test_fill_question_is_literal_with_other_braces():
    prompt = "USER: <Speech><SpeechHere></Speech> Given {\"a\": 1}, the speech says '{}'.\nASSISTANT:"
    filled = fill_question(prompt, "what is {x}?")
    assert filled == "USER: <Speech><SpeechHere></Speech> Given {\"a\": 1}, the speech says 'what is {x}?'." \
                     "\nASSISTANT:"


def test_choose_prompt_first_without_rng_and_seeded_with_rng():
    prompts = {"asr": [f"p{i} {SPEECH_TAG}" for i in range(8)], "QA": [f"{SPEECH_TAG} {{}}"]}
    assert choose_prompt(prompts, "asr") == "p0 " + SPEECH_TAG
    draws = [choose_prompt(prompts, "asr", rng=random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same prompt
    assert len({choose_prompt(prompts, "asr", rng=random.Random(s)) for s in range(20)}) > 1
    assert choose_prompt(prompts, "QA", "Who speaks?") == f"{SPEECH_TAG} Who speaks?"


def test_unknown_task_lists_known_tasks():
    with pytest.raises(PromptError, match="known tasks: QA, asr"):
        choose_prompt({"asr": ["a"], "QA": ["b"]}, "translation")


def test_expand_turns_gives_one_slot_per_turn_with_its_text_in_order():
    prompt = f"USER: {SPEECH_TAG} How did my emotions change?\nASSISTANT:"
    turns = [TurnText("first words", "reply one"), TurnText("second words", "reply two"), TurnText("question")]
    expanded = expand_turns(prompt, turns)
    assert expanded.count(SPEECH_SLOT) == 3
    lines = expanded.split("\n")
    assert lines[0] == f"USER: Turn 1: {SPEECH_TAG} Transcript: first words Assistant: reply one"
    assert lines[1] == f"Turn 2: {SPEECH_TAG} Transcript: second words Assistant: reply two"
    assert lines[2] == f"Turn 3: {SPEECH_TAG} Transcript: question"
    assert lines[3:] == ["How did my emotions change?", "ASSISTANT:"]


def test_expand_turns_audio_only_and_chinese_labels():
    expanded = expand_turns(f"USER: {SPEECH_TAG} 说说。\nASSISTANT:", [TurnText(), TurnText()], "zh")
    assert expanded == f"USER: 第1轮：{SPEECH_TAG}\n第2轮：{SPEECH_TAG}\n说说。\nASSISTANT:"


def test_expand_turns_needs_exactly_one_tag():
    with pytest.raises(PromptError, match="exactly one"):
        expand_turns(f"{SPEECH_TAG} and {SPEECH_TAG}", [TurnText()])


def test_question_single_file_is_the_original_form_and_several_files_get_turns():
    assert VICUNA.render(question_messages("What is said?", 1, "en", real_turns=False)) == \
        f"USER: {SPEECH_TAG} What is said?\nASSISTANT:"
    several = VICUNA.render(question_messages("What changed?", 3, "en", real_turns=False))
    assert several.count(SPEECH_SLOT) == 3 and several.startswith("USER: Turn 1: ")
    assert several.endswith("What changed?\nASSISTANT:")
    turns = question_messages("What changed?", 3, "en", real_turns=True)
    assert [m["role"] for m in turns] == ["user"] * 3
    assert [m["content"] for m in turns] == [SPEECH_TAG, SPEECH_TAG, f"{SPEECH_TAG}\nWhat changed?"]


def test_real_turns_put_each_turn_in_its_own_message_and_earlier_replies_between_them():
    prompt = f"{SPEECH_TAG} How did my emotions change?"
    turns = [TurnText("first words", "reply one"), TurnText("second words", "reply two"), TurnText("question", "x")]
    messages = conversation(prompt, turns, "en", real_turns=True)
    assert messages == [
        {"role": "user", "content": f"{SPEECH_TAG} Transcript: first words"},
        {"role": "assistant", "content": "reply one"},
        {"role": "user", "content": f"{SPEECH_TAG} Transcript: second words"},
        {"role": "assistant", "content": "reply two"},
        {"role": "user", "content": f"{SPEECH_TAG} Transcript: question\nHow did my emotions change?"},
    ]  # the last turn's reply is never shown: it is what the model answers
    audio_only = conversation(prompt, [TurnText(), TurnText()], "zh", real_turns=True)
    assert [m["content"] for m in audio_only] == [SPEECH_TAG, f"{SPEECH_TAG}\nHow did my emotions change?"]
    with pytest.raises(PromptError, match="exactly one"):
        conversation(f"{SPEECH_TAG} {SPEECH_TAG}", turns, "en", real_turns=True)


def test_prompt_key_prefers_the_language_variant():
    prompts = {"empathy": ["a"], "empathy_zh": ["b"]}
    assert prompt_key(prompts, "empathy", "zh") == "empathy_zh"
    assert prompt_key(prompts, "empathy", "en") == "empathy"


@pytest.mark.parametrize("name", ["train_prompt.json", "test_prompt.json"])
def test_shipped_prompt_files_cover_the_dialogue_tasks_in_both_languages(name, caplog):
    with caplog.at_level(logging.WARNING, logger="prompting"):
        prompts = load_prompts(str(ROOT / "prompts" / name))
    assert not caplog.records  # every shipped prompt is usable
    for task in DIALOGUE_TASKS:
        for key in (task, f"{task}_zh"):
            for prompt in prompts[key]:
                expanded = expand_turns(prompt, [TurnText()] * 4)
                assert expanded.count(SPEECH_SLOT) == 4 and "{}" not in expanded
    for task in ("asr", "asr_zh", "audiocaption", "QA", "emotion_recognition"):
        assert task in prompts


def test_train_and_test_prompt_files_have_the_same_tasks():
    train = load_prompts(str(ROOT / "prompts" / "train_prompt.json"))
    test = load_prompts(str(ROOT / "prompts" / "test_prompt.json"))
    assert set(train) == set(test)


def test_parity_prompts_match_the_original():
    """The original's prompts after template and Q filling, as recorded in tests/parity (README, forward.*)."""
    prompts = load_prompts(str(ROOT / "tests" / "parity" / "prompts" / "train_prompt_tiny.json"))
    assert len(prompts["emotion_recognition"]) == 1  # the prompt without a tag is dropped

    def rendered(task: str, question: str) -> str:
        return VICUNA.render(conversation(choose_prompt(prompts, task, question), None, "en", False))

    assert rendered("emotion_recognition", "") == \
        "USER: <Speech><SpeechHere></Speech> Describe the emotion of the speaker in one word.\nASSISTANT:"
    assert rendered("QA", "What is the speaker doing?") == \
        "USER: <Speech><SpeechHere></Speech> What is the speaker doing?\nASSISTANT:"
