import json
import logging
import random
from pathlib import Path

import pytest

from prompting import (SPEECH_SLOT, SPEECH_TAG, PromptError, TurnText, apply_template, choose_prompt,
                       expand_turns, fill_question, load_prompts, prompt_key, question_prompt)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "USER: {}\nASSISTANT:"
DIALOGUE_TASKS = ("emotional_trajectory", "emotional_reasoning", "empathy")


def write_prompts(tmp_path: Path, prompts: dict) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_each_prompt_is_wrapped_once_and_keeps_its_own_braces(tmp_path):
    path = write_prompts(tmp_path, {"QA": [f"{SPEECH_TAG} {{}}"], "asr": [f"{SPEECH_TAG} Transcribe.",
                                                                          f"{SPEECH_TAG} Write it down."]})
    prompts = load_prompts(path, TEMPLATE)
    assert prompts["QA"] == [f"USER: {SPEECH_TAG} {{}}\nASSISTANT:"]
    for prompt in prompts["asr"]:
        assert prompt.count("USER:") == 1 and prompt.count("ASSISTANT:") == 1
        assert "{}" not in prompt


def test_prompt_without_speech_slot_is_dropped_with_a_warning_naming_task_and_prompt(tmp_path, caplog):
    path = write_prompts(tmp_path, {"emotion_recognition": [f"{SPEECH_TAG} One word.", "No tag here."],
                                    "text_only": ["Only text."]})
    with caplog.at_level(logging.WARNING, logger="prompting"):
        prompts = load_prompts(path, TEMPLATE)
    assert prompts == {"emotion_recognition": [f"USER: {SPEECH_TAG} One word.\nASSISTANT:"]}
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "'emotion_recognition'" in warnings and "No tag here." in warnings
    assert "'text_only'" in warnings


def test_missing_prompt_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_prompts(str(tmp_path / "nowhere.json"), TEMPLATE)


def test_template_needs_exactly_one_slot():
    with pytest.raises(PromptError, match="exactly one"):
        apply_template("x", "USER: {} and {}")
    with pytest.raises(PromptError, match="exactly one"):
        apply_template("x", "USER:")


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


def test_question_prompt_single_file_is_the_original_form_and_several_files_get_turns():
    assert question_prompt("What is said?", 1, TEMPLATE) == f"USER: {SPEECH_TAG} What is said?\nASSISTANT:"
    several = question_prompt("What changed?", 3, TEMPLATE)
    assert several.count(SPEECH_SLOT) == 3 and several.startswith("USER: Turn 1: ")
    assert several.endswith("What changed?\nASSISTANT:")


def test_prompt_key_prefers_the_language_variant():
    prompts = {"empathy": ["a"], "empathy_zh": ["b"]}
    assert prompt_key(prompts, "empathy", "zh") == "empathy_zh"
    assert prompt_key(prompts, "empathy", "en") == "empathy"


@pytest.mark.parametrize("name", ["train_prompt.json", "test_prompt.json"])
def test_shipped_prompt_files_cover_the_dialogue_tasks_in_both_languages(name, caplog):
    with caplog.at_level(logging.WARNING, logger="prompting"):
        prompts = load_prompts(str(ROOT / "prompts" / name), TEMPLATE)
    assert not caplog.records  # every shipped prompt is usable
    for task in DIALOGUE_TASKS:
        for key in (task, f"{task}_zh"):
            for prompt in prompts[key]:
                expanded = expand_turns(prompt, [TurnText()] * 4)
                assert expanded.count(SPEECH_SLOT) == 4 and "{}" not in expanded
    for task in ("asr", "asr_zh", "audiocaption", "QA", "emotion_recognition"):
        assert task in prompts


def test_train_and_test_prompt_files_have_the_same_tasks():
    train = load_prompts(str(ROOT / "prompts" / "train_prompt.json"), TEMPLATE)
    test = load_prompts(str(ROOT / "prompts" / "test_prompt.json"), TEMPLATE)
    assert set(train) == set(test)


def test_parity_prompts_match_the_original():
    """The original's prompts after template and Q filling, as recorded in tests/parity (README, forward.*)."""
    prompts = load_prompts(str(ROOT / "tests" / "parity" / "prompts" / "train_prompt_tiny.json"), TEMPLATE)
    assert len(prompts["emotion_recognition"]) == 1  # the prompt without a tag is dropped
    assert choose_prompt(prompts, "emotion_recognition", "") == \
        "USER: <Speech><SpeechHere></Speech> Describe the emotion of the speaker in one word.\nASSISTANT:"
    assert choose_prompt(prompts, "QA", "What is the speaker doing?") == \
        "USER: <Speech><SpeechHere></Speech> What is the speaker doing?\nASSISTANT:"
