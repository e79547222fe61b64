"""How HumDial answers are scored: the generic metrics (metrics.Scorer) plus each challenge task's own (the task
table's `trajectory_metric`: humdial.trajectory). train.py and evaluate.py hand a HumDialScorer to the runner and
the decode; the engine below them knows no challenge."""
from __future__ import annotations

from typing import Any

from humdial.tasks import TASKS
from humdial.trajectory import aligned_emotions, emotion_trajectory_scores
from metrics import Scorer


def gold_trajectories(task: str, records: list[dict[str, Any]]) -> list[list[str]] | None:
    """Every record's per-turn gold labels; None when no turn has one (a blind test set), ValueError when only
    some do (a half-labelled set would be scored on the wrong turns)."""
    if not any(label for r in records for label in r.get("emotions") or []):
        return None
    if not all(r.get("emotions") and all(r["emotions"]) for r in records):
        raise ValueError(f"task {task}: some records lack gold per-turn emotion labels; label every turn")
    return [r["emotions"] for r in records]


def has_trajectory(task: str) -> bool:
    return task in TASKS and TASKS[task].trajectory_metric


class HumDialScorer(Scorer):
    """The generic scores, and for Task 1 the trajectory's exact match and per-turn accuracy over gold labels."""

    def group_scores(self, task: str, language: str, records: list[dict[str, Any]]) -> dict[str, float]:
        scores = super().group_scores(task, language, records)
        gold = gold_trajectories(task, records) if has_trajectory(task) else None
        if gold is not None:
            trajectory = emotion_trajectory_scores(gold, [r["prediction"] for r in records])
            scores.update(emotion_exact=trajectory.exact_match, emotion_turn_acc=trajectory.turn_accuracy)
        return scores

    def readings(self, record: dict[str, Any]) -> dict[str, Any]:
        """`emotions_read`: per gold turn, the emotions the trajectory metric read from the answer."""
        gold = record.get("emotions") or []
        if not (has_trajectory(record["task"]) and gold):
            return {}
        return {"emotions_read": [list(s) for s in aligned_emotions(record["prediction"], len(gold))]}
