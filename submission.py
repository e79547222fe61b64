"""The challenge submission as a `testset_id,text` CSV per task: written, and checked against the test set.

    python evaluate.py --validate outputs/demo/eval_test/submission_emotional_trajectory.csv \
        --ann data/demo/ann/test.json --task emotional_trajectory
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from dataset_v1 import read_annotation

SUBMISSION_HEADER = ["testset_id", "text"]


def submission_text(prediction: str) -> str:
    """One line per answer: line breaks inside an answer become spaces."""
    return " ".join(prediction.split())


def write_submissions(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One `testset_id,text` CSV per task (a dialogue id appears once per task)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    paths = []
    for task, task_records in sorted(by_task.items()):
        path = out_dir / f"submission_{task}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SUBMISSION_HEADER)
            writer.writerows([r["id"], submission_text(r["prediction"])] for r in task_records)
        paths.append(path)
    return paths


def validate_submission(path: str | Path, expected_ids: set[str] | None = None) -> list[str]:
    """Problems with a submission CSV (an empty list when it is fine): header, columns, empty or duplicate
    ids, empty or multi-line answers, and, given the test set's ids, missing or unknown ones."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        return [f"{path}: file not found"]
    except (UnicodeDecodeError, csv.Error) as e:
        return [f"{path}: not a readable UTF-8 CSV file: {e}"]
    if not rows:
        return [f"{path}: empty file, expected the header {','.join(SUBMISSION_HEADER)}"]
    problems = []
    if rows[0] != SUBMISSION_HEADER:
        problems.append(f"{path}: header is {','.join(rows[0])!r}, expected {','.join(SUBMISSION_HEADER)!r}")
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path}:{line}"
        if len(row) != len(SUBMISSION_HEADER):
            problems.append(f"{where}: {len(row)} columns, expected 2 (quote answers that hold commas)")
            continue
        testset_id, text = row
        if not testset_id.strip():
            problems.append(f"{where}: empty testset_id")
        elif testset_id in seen:
            problems.append(f"{where}: duplicate testset_id {testset_id!r}")
        else:
            seen.add(testset_id)
        if not text.strip():
            problems.append(f"{where}: empty answer for {testset_id!r}")
        elif "\n" in text or "\r" in text:
            problems.append(f"{where}: the answer for {testset_id!r} spans several lines")
    if expected_ids is not None:
        missing, unknown = sorted(expected_ids - seen), sorted(seen - expected_ids)
        if missing:
            problems.append(f"{path}: {len(missing)} test id(s) have no row, e.g. {', '.join(missing[:5])}")
        if unknown:
            problems.append(f"{path}: {len(unknown)} id(s) are not in the test set, e.g. {', '.join(unknown[:5])}")
    return problems


def annotation_ids(ann_path: str, task: str | None = None) -> set[str]:
    """The dialogue ids of an annotation file (of one task, when given): what a submission must cover."""
    return {entry["id"] for entry in read_annotation(ann_path) if task is None or entry["task"] == task}
