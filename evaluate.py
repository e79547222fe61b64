"""Decode an annotation file in batches, score the answers and write the challenge submission.

    python evaluate.py                     # tiny demo model on data/demo/ann/test.json -> outputs/demo/eval_test/
    python evaluate.py --options model.ckpt=outputs/demo/checkpoint_best.pth --batch-size 4
    python evaluate.py --cfg-path configs/finetune_humdial.yaml --cfg-path configs/decode_config.yaml \\
        --options model.ckpt=outputs/finetune_humdial/checkpoint_best.pth --batch-size 8
    python evaluate.py --validate outputs/demo/eval_test/submission_emotional_trajectory.csv --ann data/demo/ann/test.json

Writes to --out-dir:
    predictions.jsonl           one line per sample: id, task, language, prompt, prediction, reference, emotions
    submission_<task>.csv       `testset_id,text`, one row per dialogue (one file per task: ids repeat across tasks)
    scores.json                 the metrics below, the generation settings and the annotation file
and prints a table of the scores.

Metrics per (task, language), all in % (metrics.py): `asr*` tasks get WER (English) or CER (Chinese); every other
task gets BLEU and ROUGE-L; `emotional_trajectory` also gets emotion_exact (the whole emotion sequence right) and
emotion_turn_acc (share of gold turns whose emotion is named at the right position).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import metrics
from cli_inference import add_model_arguments, autocast_for, generation_settings, load_inference_config, \
    load_model, resolve_device
from dataset_v1 import AnnotationError, AudioError, build_dataset, read_annotation
from utils import ConfigError

SUBMISSION_HEADER = ["testset_id", "text"]
TRAJECTORY_TASKS = {"emotional_trajectory"}


# ---------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode(model, loader: DataLoader, generate_settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Answers for every sample in loader order. Batches are left-padded and each sample stops at its own
    end token (SALMONN.generate)."""
    records = []
    for batch in tqdm(loader, desc="decode", unit="batch", dynamic_ncols=True):
        with autocast_for(model):
            predictions = model.generate(batch, generate_settings)
        for i, prediction in enumerate(predictions):
            records.append({"id": batch["id"][i], "task": batch["task"][i], "language": batch["language"][i],
                            "prompt": batch["prompt"][i], "prediction": prediction, "reference": batch["text"][i],
                            "emotions": batch["emotions"][i]})
    return records


def write_predictions(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------- submission
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


# ---------------------------------------------------------------------------------------------- scoring
def record_language(record: dict[str, Any]) -> str:
    return record.get("language") or ("zh" if metrics.is_chinese(record["reference"]) else "en")


def score_group(task: str, language: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics that fit one task in one language; none for a blind test set (no references)."""
    refs = [r["reference"] for r in records]
    hyps = [r["prediction"] for r in records]
    if not any(ref.strip() for ref in refs):
        return {}
    if task.startswith("asr"):
        return {"cer": metrics.cer(refs, hyps)} if language == "zh" else {"wer": metrics.wer(refs, hyps)}
    scores = {"bleu": metrics.bleu(refs, hyps, language), "rouge_l": metrics.rouge_l(refs, hyps, language)}
    if task in TRAJECTORY_TASKS and any(r.get("emotions") for r in records):
        if not all(r.get("emotions") and all(r["emotions"]) for r in records):
            raise ValueError(f"task {task}: some records lack gold per-turn emotion labels; label every turn")
        trajectory = metrics.emotion_trajectory_scores([r["emotions"] for r in records], hyps)
        scores.update(emotion_exact=trajectory.exact_match, emotion_turn_acc=trajectory.turn_accuracy)
    return scores


def group_records(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["task"], record_language(record)].append(record)
    return dict(sorted(groups.items()))


def score_predictions(records: list[dict[str, Any]]) -> dict[str, float]:
    """Flat `{task}/{language}/{metric}` -> score (%). Records: {task, prediction, reference, language?,
    emotions?}; the language is guessed from the reference when absent."""
    return {f"{task}/{language}/{name}": value
            for (task, language), group in group_records(records).items()
            for name, value in score_group(task, language, group).items()}


def format_table(scores: dict[str, float], counts: dict[str, int]) -> str:
    rows = [("task", "lang", "n", "metric", "score")]
    for key, value in scores.items():
        task, language, name = key.split("/")
        rows.append((task, language, str(counts[f"{task}/{language}"]), name, f"{value:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--ann", default=None, help="annotation JSON to decode (default: datasets.test_ann_path)")
    parser.add_argument("--out-dir", default=None, help="default: <run.output_dir>/eval_<annotation name>")
    parser.add_argument("--batch-size", type=int, default=None, help="default: run.batch_size_eval")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers; default: run.num_workers")
    parser.add_argument("--limit", type=int, default=0, help="decode only the first N samples (0: all)")
    parser.add_argument("--validate", metavar="CSV", default=None,
                        help="only check a submission CSV (against --ann's ids when given) and exit")
    parser.add_argument("--task", default=None, help="with --validate and --ann: the task whose ids to expect")
    return parser.parse_args(argv)


def run_validation(csv_path: str, ann_path: str | None, task: str | None) -> int:
    expected = annotation_ids(ann_path, task) if ann_path else None
    problems = validate_submission(csv_path, expected)
    for problem in problems:
        print(problem)
    print(f"{csv_path}: {'INVALID, ' + str(len(problems)) + ' problem(s)' if problems else 'valid'}")
    return 1 if problems else 0


def evaluate(args: argparse.Namespace) -> int:
    cfg = load_inference_config(args.cfg_path, args.options)
    ann_path = args.ann or cfg.get("datasets", {}).get("test_ann_path")
    if not ann_path:
        raise ConfigError("no annotation file: pass --ann or set datasets.test_ann_path")
    dataset = build_dataset(ann_path, cfg.get("datasets", {}), "test", cfg.model)
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    out_dir = Path(args.out_dir or Path(cfg.run.output_dir) / f"eval_{Path(ann_path).stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
    settings = generation_settings(cfg.generate, args)
    loader = DataLoader(dataset, batch_size=args.batch_size or cfg.run.batch_size_eval, shuffle=False,
                        num_workers=cfg.run.num_workers if args.num_workers is None else args.num_workers,
                        collate_fn=(dataset.dataset if isinstance(dataset, Subset) else dataset).collater)

    records = decode(model, loader, settings)
    write_predictions(records, out_dir / "predictions.jsonl")
    for path in write_submissions(records, out_dir):
        for problem in validate_submission(path):
            print(f"warning: {problem}", file=sys.stderr)
    scores = score_predictions(records)
    counts = {f"{task}/{language}": len(group) for (task, language), group in group_records(records).items()}
    (out_dir / "scores.json").write_text(json.dumps(
        {"annotation": str(ann_path), "num_samples": len(records), "generate": settings, "counts": counts,
         "scores": scores}, ensure_ascii=False, indent=1), encoding="utf-8")
    print(format_table(scores, counts))
    print(f"wrote predictions.jsonl, submission_<task>.csv and scores.json to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.validate:
            return run_validation(args.validate, args.ann, args.task)
        return evaluate(args)
    except (ConfigError, AnnotationError, AudioError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
