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
task gets BLEU and ROUGE-L; `emotional_trajectory` also gets emotion_exact and emotion_turn_acc. The same files
come out of `train.py` with `run.evaluate: true` (both write through inference.write_decode_outputs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from config import ConfigError
from dataset_v1 import AnnotationError, AudioError, build_dataset, collate
from inference import (add_model_arguments, decode, generation_settings, inference_dtype, load_inference_config,
                       load_model, write_decode_outputs)
from metrics import format_table
from submission import annotation_ids, validate_submission
from utils import resolve_device


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
    model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
    settings = generation_settings(cfg.generate, args)
    loader = DataLoader(dataset, batch_size=args.batch_size or cfg.run.batch_size_eval, shuffle=False,
                        num_workers=cfg.run.num_workers if args.num_workers is None else args.num_workers,
                        collate_fn=collate)

    records = list(decode(model, loader, settings, inference_dtype(cfg, model)))
    scores, counts = write_decode_outputs(records, out_dir, cfg, {"annotation": str(ann_path),
                                                                      "generate": settings})
    for path in sorted(out_dir.glob("submission_*.csv")):
        for problem in validate_submission(path):
            print(f"warning: {problem}", file=sys.stderr)
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
