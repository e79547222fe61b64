"""Does the emotion-trajectory metric tell a right answer from one that ignores the dialogue?

On a HumDial Task 1 file in the release layout (`{"dialogue_id", "turns": [{"emotion", "response_txt", ...}]}`,
the last turn's `response_txt` being the organisers' reference answer), it prints per-turn accuracy and exact
match (%, `metrics.emotion_trajectory_scores`) of four kinds of answer against the gold labels:

- reference: each dialogue's own reference answer (a good metric scores it high);
- fixed:     "你先是X，后来Y，最后平静了下来。" for the best-scoring ordered pair (X, Y) of the plain Chinese
             label words (`tools.demo_answers.LABEL_WORDS`): an answer that ignores the dialogue (it should score low);
- other:     each dialogue scored with the next dialogue's reference answer, cyclically (low too);
- others:    each dialogue scored with every other dialogue's reference answer in turn (all cyclic shifts): the
             same question without depending on the file's order, which can make neighbours' trajectories
             systematically alike or unlike.

Each figure is given on all dialogues and on two halves split by a hash of the dialogue id (`dev`, `check`), so
that a change tuned while looking at one half can be confirmed on the other.

    python -m scripts.measure_trajectory_metric ../shared/humdial_real/task1_3.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from pathlib import Path

from humdial.trajectory import TrajectoryScores, emotion_trajectory_scores
from metrics import EMOTIONS
from tools.demo_answers import LABEL_WORDS
from utils import jsonl_values

FIXED_ANSWER = "你先是{}，后来{}，最后平静了下来。"


def load_dialogues(path: Path) -> list[dict]:
    """The file's dialogues, one JSON object a line (blank lines skipped)."""
    return jsonl_values(path)


def half_of(dialogue_id: str) -> str:
    """'dev' or 'check', from the parity of the id's SHA-256: stable, and blind to the content."""
    return "dev" if int(hashlib.sha256(dialogue_id.encode("utf-8")).hexdigest(), 16) % 2 == 0 else "check"


def gold_labels(dialogue: dict) -> list[str]:
    """Every turn's label, the closing question's (neutral) included: the metric decides what it scores."""
    return [turn["emotion"] for turn in dialogue["turns"]]


def reference_answer(dialogue: dict) -> str:
    """The organisers' answer to the closing question: the last turn's reply."""
    return dialogue["turns"][-1]["response_txt"]


def best_fixed_answer(gold: list[list[str]]) -> tuple[str, TrajectoryScores]:
    """The fixed answer (over every ordered pair of label words) with the highest per-turn accuracy (ties: the
    higher exact match)."""
    words = [LABEL_WORDS["zh"][label] for label in EMOTIONS]
    scored = [(FIXED_ANSWER.format(x, y), emotion_trajectory_scores(gold, [FIXED_ANSWER.format(x, y)] * len(gold)))
              for x, y in itertools.product(words, repeat=2)]
    return max(scored, key=lambda pair: (pair[1].turn_accuracy, pair[1].exact_match))


def part_rows(name: str, dialogues: list[dict]) -> list[tuple[str, str, TrajectoryScores, str]]:
    """(part, answer kind, scores, note) for each kind of answer on one part of the file."""
    gold = [gold_labels(d) for d in dialogues]
    references = [reference_answer(d) for d in dialogues]
    fixed, fixed_scores = best_fixed_answer(gold)
    shifts = range(1, len(dialogues))
    every_other = emotion_trajectory_scores([g for _ in shifts for g in gold],
                                            [a for k in shifts for a in references[k:] + references[:k]])
    return [(name, "reference", emotion_trajectory_scores(gold, references), ""),
            (name, "fixed", fixed_scores, fixed),
            (name, "other", emotion_trajectory_scores(gold, references[1:] + references[:1]),
             "next dialogue's reference"),
            (name, "others", every_other, f"every other dialogue's reference ({len(shifts)} shifts)")]


def format_rows(rows: list[tuple[str, str, TrajectoryScores, str]]) -> str:
    """The rows as an aligned text table."""
    lines = [f"{'part':<6} {'answer':<10} {'samples':>8} {'turns':>7} {'per-turn %':>10} {'exact %':>8}  note"]
    for part, kind, scores, note in rows:
        lines.append(f"{part:<6} {kind:<10} {scores.num_samples:>8} {scores.num_turns:>7} "
                     f"{scores.turn_accuracy:>10.1f} {scores.exact_match:>8.1f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a HumDial Task 1 jsonl file (e.g. task1_3.jsonl)")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        sys.exit(f"error: no such file: {args.path}")
    dialogues = load_dialogues(args.path)
    parts = {"all": dialogues}
    for half in ("dev", "check"):
        parts[half] = [d for d in dialogues if half_of(d["dialogue_id"]) == half]
    print(format_rows([row for name, part in parts.items() if part for row in part_rows(name, part)]))


if __name__ == "__main__":
    main()
