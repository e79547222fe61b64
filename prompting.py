"""Prompts: the template, the prompt files and the per-turn expansion. The one place prompts are built.

A prompt file maps a task to a list of prompts (or to one prompt, as the original `test_prompt.json` does).
Every usable prompt holds `<SpeechHere>`, where the model splices speech tokens in; `load_prompts` wraps each
prompt in the chat template exactly once. A task prompt may hold `{}`, which `fill_question` replaces by the
sample's question `Q`.

Dialogue tasks: the prompt file has one `SPEECH_TAG` per prompt; `expand_turns` replaces it by one line per user
turn, so the model sees which speech belongs to which turn:

    USER: Turn 1: <Speech><SpeechHere></Speech>
    Turn 2: <Speech><SpeechHere></Speech> Transcript: ... Assistant: ...
    Turn 3: <Speech><SpeechHere></Speech>
    <task instruction>
    ASSISTANT:
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

from models import SPEECH_SLOT

log = logging.getLogger(__name__)

SPEECH_TAG = f"<Speech>{SPEECH_SLOT}</Speech>"
QUESTION_SLOT = "{}"

# Labels of the per-turn block (each with its separator), per language; English for any other language.
TURN_LABELS = {
    "en": {"turn": "Turn {n}: ", "transcript": "Transcript: ", "reply": "Assistant: "},
    "zh": {"turn": "第{n}轮：", "transcript": "文字：", "reply": "助手："},
}


class PromptError(ValueError):
    """A prompt file, template or prompt that cannot be used as asked."""


@dataclass(frozen=True)
class TurnText:
    """The text shown with one user turn's speech; None means the turn shows only its audio."""
    transcript: str | None = None
    reply: str | None = None  # the assistant's earlier reply to this turn (never the target)


def apply_template(prompt: str, template: str) -> str:
    """Puts the prompt into the template's single `{}` (literal substitution: the prompt's own `{}` survive)."""
    if template.count(QUESTION_SLOT) != 1:
        raise PromptError(f"prompt_template must contain exactly one {{}}, got {template!r}")
    head, tail = template.split(QUESTION_SLOT)
    return head + prompt + tail


def load_prompts(path: str, template: str) -> dict[str, list[str]]:
    """Task -> prompts, each wrapped once by the template. Prompts without `<SpeechHere>` are dropped with a
    warning (the original dropped them silently); a task left with no prompt is dropped the same way."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise PromptError(f"{path}: expected an object mapping task -> prompt(s), got {type(raw).__name__}")
    prompts: dict[str, list[str]] = {}
    for task, value in raw.items():
        candidates = [value] if isinstance(value, str) else value
        if not isinstance(candidates, list) or not all(isinstance(p, str) for p in candidates):
            raise PromptError(f"{path}: task {task!r}: expected a string or a list of strings")
        kept = []
        for prompt in candidates:
            if SPEECH_SLOT not in prompt:
                log.warning("%s: task %r: dropping a prompt without %s: %r", path, task, SPEECH_SLOT, prompt)
                continue
            kept.append(apply_template(prompt, template))
        if kept:
            prompts[task] = kept
        else:
            log.warning("%s: task %r has no prompt with %s; the task is dropped", path, task, SPEECH_SLOT)
    return prompts


def fill_question(prompt: str, question: str) -> str:
    """Replaces the task prompt's `{}` by the question, literally (other braces in either are left alone)."""
    return prompt.replace(QUESTION_SLOT, question)


def choose_prompt(prompts: dict[str, list[str]], task: str, question: str = "",
                  rng: random.Random | None = None) -> str:
    """The task's first prompt (rng None: evaluation, deterministic) or a random one, with `{}` filled."""
    if task not in prompts:
        raise PromptError(f"no prompt for task {task!r}; known tasks: {', '.join(sorted(prompts))}")
    options = prompts[task]
    prompt = options[0] if rng is None else rng.choice(options)
    return fill_question(prompt, question)


def prompt_key(prompts: dict[str, list[str]], task: str, language: str) -> str:
    """The prompt-file key for a task in a language: `task_zh` when the file has it (as `asr_zh`), else `task`."""
    localized = f"{task}_{language}"
    return localized if localized in prompts else task


def turn_block(turns: list[TurnText], language: str = "en") -> str:
    """One line per turn: its speech tag, then its transcript and earlier reply when given."""
    if not turns:
        raise PromptError("a dialogue needs at least one turn")
    labels = TURN_LABELS.get(language, TURN_LABELS["en"])
    lines = []
    for n, turn in enumerate(turns, start=1):
        line = labels["turn"].format(n=n) + SPEECH_TAG
        if turn.transcript is not None:
            line += f" {labels['transcript']}{turn.transcript}"
        if turn.reply is not None:
            line += f" {labels['reply']}{turn.reply}"
        lines.append(line)
    return "\n".join(lines)


def expand_turns(prompt: str, turns: list[TurnText], language: str = "en") -> str:
    """Replaces the prompt's single speech tag by the per-turn block: one `<SpeechHere>` per turn."""
    if prompt.count(SPEECH_TAG) != 1 or prompt.count(SPEECH_SLOT) != 1:
        raise PromptError(f"a dialogue prompt needs exactly one {SPEECH_TAG}, got {prompt!r}")
    head, tail = prompt.split(SPEECH_TAG)
    tail = tail.lstrip(" ")
    separator = "\n" if tail and not tail.startswith("\n") else ""
    return head + turn_block(turns, language) + separator + tail


def question_prompt(question: str, num_turns: int, template: str, language: str = "en") -> str:
    """A full prompt for a plain question about `num_turns` audio files (CLI, web demo): one file is asked
    about the original way (`<Speech><SpeechHere></Speech> question`), several as a per-turn block."""
    if num_turns < 1:
        raise PromptError("a prompt needs at least one audio file")
    prompt = f"{SPEECH_TAG} {question}".rstrip()
    if num_turns > 1:
        prompt = expand_turns(prompt, [TurnText()] * num_turns, language)
    return apply_template(prompt, template)
