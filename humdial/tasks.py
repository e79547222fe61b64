"""The HumDial Track 1 tasks in one table, and the facts of its release files: every other place (convert.py,
the scorer, the submission package, the judge, the prompt files) reads them from here.

The evaluated turn: Task 1 and Task 2 answer the last turn. Task 3 (empathy) is scored at the second user turn
whose emotion is not neutral, with the turns up to it as history: the organisers' scorer
(ASLP-lab/Hum-Dial, Emotional_Intelligence/eval_task3.py, `find_target_turn`) picks that turn from the emotion
labels of the submitted file, reading a turn without a label as not neutral. A test file without labels is read
the same way, unless it marks the turn by its replies (the turns before it have one, it and the later ones none):
then that first unanswered turn is answered. `evaluated_turn` says which of the three decided.

The judge columns are the challenge's LLM-judged text scores: each dimension scored on the task's scale, a task's
score the mean of its dimensions, ranked per language with the weights (0.2 T1 + 0.2 T2 + 0.1 T3 text); Task 3's
vocal empathy and naturalness (0.25 each) are rated by people (HUMAN_RATED). docs/judge.md has the details.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metrics import LABEL_ALIASES, text_language


@dataclass(frozen=True)
class Task:
    name: str                                # the annotations' `task`, the prompt files' key (name_zh in Chinese)
    number: int                              # HD-Track1-T<number>.jsonl
    answered_non_neutral_turn: int | None    # None: the last turn is answered; n: the n-th non-neutral turn
    trajectory_metric: bool                  # scored per turn against gold emotion labels (humdial.trajectory)
    judge_dimensions: tuple[str, ...]        # the judge's rubric
    judge_scale: tuple[int, ...]             # the scores it allows; a reply's number goes to the nearest
    weight: float                            # the task's judged text score in the per-language ranking


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("emotional_trajectory", 1, None, True,
         ("Accuracy_Completeness", "Depth_Granularity", "Added_Value"), (1, 3, 5), 0.2),
    Task("emotional_reasoning", 2, None, False,
         ("Information_Integration", "Insight_RootCause", "Clarity_Logic"), (1, 3, 5), 0.2),
    Task("empathy", 3, 2, False, ("textual_empathy_insight",), (1, 2, 3, 4, 5), 0.1),
)}
TASK_BY_NUMBER = {task.number: name for name, task in TASKS.items()}
EMPATHY = "empathy"  # the task whose replies are also spoken (the package's wav files)
HUMAN_RATED = {"empathy/vocal_empathy_congruence": 0.25, "empathy/audio_quality_naturalness": 0.25}
LANGUAGES = ("zh", "en")

REPLY_KEYS = ("response_text", "response_txt")  # the training files spell it response_txt
REPLY_KEY = "response_text"  # what the scorer reads
AUDIO_KEY = "response_audio"
_TASK_IN_NAME = re.compile(r"(?:^|[^a-z0-9])t(?:ask)?[-_]?([123])(?![0-9])", re.IGNORECASE)


def task_from_name(path: Path) -> str | None:
    """The task a file or folder name spells (`HD-Track1-T2.jsonl`, `task1_3.jsonl` = task 1 with 3 turns), if
    any: the number right after `T`/`task`, so neither `Track1` nor the turn count `_3` is read as a task."""
    for name in (path.stem, path.parent.name):
        match = _TASK_IN_NAME.search(name)
        if match:
            return TASK_BY_NUMBER[int(match.group(1))]
    return None


def package_file_name(task: str) -> str:
    """`HD-Track1-T<n>.jsonl`, the name the release and the package give a task's dialogues."""
    return f"HD-Track1-T{TASKS[task].number}.jsonl"


def response_wav(dialogue_id: str, turn_id: object) -> str:
    """Where a Task 3 reply is spoken, relative to the language folder of the package."""
    return f"{package_file_name(EMPATHY).removesuffix('.jsonl')}/{dialogue_id}_{turn_id}_response.wav"


def turn_id_of(turn: Mapping[str, Any], index: int) -> object:
    """The release's turn_id (the turn's position, from 1, for a record without one)."""
    return turn.get("turn_id", index + 1)


def release_language(record: Mapping[str, Any], folder: str) -> str:
    """`language` field, else the release's language folder (`zh/`, `en/`), else a `zh`/`en` part of the
    dialogue id (`zh_0102_0001`, `task2_4_en_0002_0014`), else zh when the turns' text has CJK characters."""
    if isinstance(record.get("language"), str):
        return record["language"]
    if folder in LANGUAGES:
        return folder
    parts = str(record.get("dialogue_id", "")).lower().split("_")
    for language in LANGUAGES:
        if language in parts:
            return language
    turns = record.get("turns") if isinstance(record.get("turns"), list) else []
    return text_language(" ".join(t["text"] for t in turns if isinstance(t, dict) and isinstance(t.get("text"), str)))


def has_reply(turn: Mapping[str, Any]) -> bool:
    return any(isinstance(turn.get(key), str) and turn[key].strip() for key in REPLY_KEYS)


def is_neutral(label: object) -> bool:
    """A neutral label (or an alias of it); a missing or empty label is not neutral, as the scorer reads it."""
    key = label.strip().lower() if isinstance(label, str) else ""
    return LABEL_ALIASES.get(key, key) == "neutral"


def first_unanswered_turn(turns: list[Mapping[str, Any]]) -> int | None:
    """The turn a test file marks by its replies: every turn before it has one, it and every later one none."""
    answered = [has_reply(t) for t in turns]
    count = answered.index(False) if False in answered else len(answered)
    if 0 < count < len(turns) and not any(answered[count:]):
        return count
    return None


def evaluated_turn(turns: list[Mapping[str, Any]], task: str) -> tuple[int, str]:
    """(index of the turn whose reply is scored, what decided it: last_turn | labels | first_unanswered_turn |
    unlabelled_as_non_neutral). ValueError when an empathy dialogue has too few non-neutral turns."""
    if not turns:
        raise ValueError("the dialogue has no turns")
    rank = TASKS[task].answered_non_neutral_turn
    if rank is None:
        return len(turns) - 1, "last_turn"
    labels = [t.get("emotion") for t in turns]
    if all(isinstance(label, str) and label.strip() for label in labels):
        how = "labels"
    else:
        marked = first_unanswered_turn(turns)
        if marked is not None:
            return marked, "first_unanswered_turn"
        how = "unlabelled_as_non_neutral"
    non_neutral = [i for i, label in enumerate(labels) if not is_neutral(label)]
    if len(non_neutral) < rank:
        raise ValueError(f"{len(non_neutral)} non-neutral turn(s) ({', '.join(map(str, labels))}): the empathy "
                         f"task is scored at the non-neutral turn number {rank}")
    return non_neutral[rank - 1], how
