"""Prompts: the prompt files, the per-turn expansion and a sample's conversation. The one place prompts are built;
models/llm.ChatText renders the conversation with the LLM's template and tokenises it.

A prompt file maps a task to a list of prompts (or to one prompt, as the original `test_prompt.json` does).
Every usable prompt holds `<SpeechHere>`, where the model splices speech tokens in. A task prompt may hold `{}`,
which `fill_question` replaces by the sample's question `Q`. A prompt is the user's message; the LLM's template
is applied when it is tokenised.

Dialogue tasks: the prompt file has one `SPEECH_TAG` per prompt. With an LLM that has a chat template, each user
turn is a user message of its own (earlier replies, when shown, assistant messages between them) and the task
instruction closes the last one (`conversation`). With the plain `prompt_template` (Vicuna, the released
checkpoints) `expand_turns` puts one line per user turn in the single user message:

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


def load_prompts(path: str) -> dict[str, list[str]]:
    """Task -> prompts. Prompts without `<SpeechHere>` are dropped with a warning (the original dropped them
    silently); a task left with no prompt is dropped the same way."""
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
            kept.append(prompt)
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


def turn_text(turn: TurnText, language: str, with_reply: bool) -> str:
    """A turn's speech tag, then its transcript (and its earlier reply) when given."""
    labels = TURN_LABELS.get(language, TURN_LABELS["en"])
    text = SPEECH_TAG
    if turn.transcript is not None:
        text += f" {labels['transcript']}{turn.transcript}"
    if with_reply and turn.reply is not None:
        text += f" {labels['reply']}{turn.reply}"
    return text


def turn_block(turns: list[TurnText], language: str = "en") -> str:
    """One line per turn: its label, speech tag, then its transcript and earlier reply when given."""
    if not turns:
        raise PromptError("a dialogue needs at least one turn")
    label = TURN_LABELS.get(language, TURN_LABELS["en"])["turn"]
    return "\n".join(label.format(n=n) + turn_text(turn, language, with_reply=True)
                     for n, turn in enumerate(turns, start=1))


def expand_turns(prompt: str, turns: list[TurnText], language: str = "en") -> str:
    """Replaces the prompt's single speech tag by the per-turn block: one `<SpeechHere>` per turn."""
    if prompt.count(SPEECH_TAG) != 1 or prompt.count(SPEECH_SLOT) != 1:
        raise PromptError(f"a dialogue prompt needs exactly one {SPEECH_TAG}, got {prompt!r}")
    head, tail = prompt.split(SPEECH_TAG)
    tail = tail.lstrip(" ")
    separator = "\n" if tail and not tail.startswith("\n") else ""
    return head + turn_block(turns, language) + separator + tail


def conversation(prompt: str, turns: list[TurnText] | None, language: str, real_turns: bool) -> list[dict[str, str]]:
    """A sample's messages. `turns` None: one clip, the prompt is the user message. A dialogue with `real_turns`
    (an LLM with a chat template): a user message per turn, its earlier reply (when shown) as an assistant message
    after it, the instruction closing the last turn; without: one user message with the per-turn block."""
    if turns is None:
        return [{"role": "user", "content": prompt}]
    if not real_turns:
        return [{"role": "user", "content": expand_turns(prompt, turns, language)}]
    if prompt.count(SPEECH_TAG) != 1 or prompt.count(SPEECH_SLOT) != 1 or not turns:
        raise PromptError(f"a dialogue prompt needs exactly one {SPEECH_TAG} and at least one turn, got {prompt!r}")
    instruction = " ".join(part.strip() for part in prompt.split(SPEECH_TAG) if part.strip())
    messages = []
    for n, turn in enumerate(turns, start=1):
        content = turn_text(turn, language, with_reply=False)
        messages.append({"role": "user", "content": f"{content}\n{instruction}" if n == len(turns) else content})
        if n < len(turns) and turn.reply is not None:
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


def question_messages(question: str, num_turns: int, language: str, real_turns: bool) -> list[dict[str, str]]:
    """The messages for a plain question about `num_turns` audio files (CLI, web demo): one file is asked about
    the original way (`<Speech><SpeechHere></Speech> question`), several as dialogue turns."""
    if num_turns < 1:
        raise PromptError("a prompt needs at least one audio file")
    prompt = f"{SPEECH_TAG} {question}".rstrip()
    return conversation(prompt, [TurnText()] * num_turns if num_turns > 1 else None, language, real_turns)
