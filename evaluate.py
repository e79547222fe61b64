"""Decode an annotation file in batches, score the answers and write the challenge submission.

    python evaluate.py                     # tiny demo model on data/demo/ann/test.json -> outputs/demo/eval_test/
    python evaluate.py --options model.ckpt=outputs/demo/checkpoint_best.pth --batch-size 4
    python evaluate.py --cfg-path configs/config.yaml --cfg-path configs/decode_config.yaml \\
        --options model.ckpt=outputs/finetune_humdial/checkpoint_best.pth --batch-size 8
    python evaluate.py --validate outputs/demo/eval_test/submission_emotional_trajectory.csv --ann data/demo/ann/test.json
    python evaluate.py --judge-url http://localhost:8000/v1 --judge-model NAME    # decode, then the LLM judge
    python evaluate.py --judge outputs/demo/eval_test/predictions.jsonl --ann data/demo/ann/test.json \\
        --judge-url http://localhost:8000/v1 --judge-model NAME                   # judge only (no model load)
    python evaluate.py --ann data/humdial_test/test.json --submission-dir outputs/HD-Track1   # + the package
    python evaluate.py --validate-package outputs/HD-Track1 --test-jsonl HD-Track1-Test/zh/HD-Track1-T1.jsonl ...

Writes to --out-dir:
    predictions.jsonl           one line per sample: id, task, language, prompt, prediction, reference, emotions
    submission_<task>.csv       `testset_id,text`, one row per dialogue (one file per task: ids repeat across tasks)
    scores.json                 the metrics below, the generation settings and the annotation file
and prints a table of the scores. With a judge (judge.base_url or --judge-url; judge.py) also
    judge_scores.json           the judge's means per task, language and dimension, the partial challenge score
    judge_cache.jsonl           every judge reply (a rerun asks only for what is missing)
and with --submission-dir DIR the package the challenge takes (submission.py), checked before it is reported:
    DIR/<lang>/HD-Track1-T<n>.jsonl                         each test dialogue, the reply in its evaluated turn
    DIR/<lang>/HD-Track1-T3/<id>_<turn>_response.wav         Task 3 replies spoken by submission.tts_command

Metrics per (task, language), all in % (metrics.py): `asr*` tasks get WER (English) or CER (Chinese); every other
task gets BLEU and ROUGE-L; `emotional_trajectory` also gets emotion_exact and emotion_turn_acc. The same files
come out of `train.py` with `run.evaluate: true` (both write through inference.write_decode_outputs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import Subset

from config import ConfigError, config_to_dict, load_config
from dataset_v1 import AnnotationError, AudioError, build_dataset, read_annotation
from inference import (DEFAULT_CFG_PATHS, add_model_arguments, check_audio_readable, decode_remaining,
                       generation_settings, inference_dtype, load_inference_config, load_model,
                       resume_decode, write_decode_outputs)
from judge import JudgeError, format_judge_table, judge_predictions, judge_records, judge_settings, load_prompts
from metrics import format_table
from submission import (PackageError, annotation_ids, check_package_dir_free, package_problems, releases_of_entries,
                        validate_package, validate_submission, write_package)
from utils import error_message, file_fingerprint, resolve_device


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
    parser.add_argument("--submission-dir", default=None, metavar="DIR",
                        help="also write the challenge package (<lang>/HD-Track1-T<n>.jsonl, Task 3 wavs) to this "
                             "new folder; --ann must come from convert.py")
    parser.add_argument("--validate-package", metavar="DIR", default=None,
                        help="only check a package against the test JSONL files (--test-jsonl) and exit")
    parser.add_argument("--test-jsonl", nargs="+", default=[], metavar="JSONL",
                        help="with --validate-package: the release's test files, e.g. zh/HD-Track1-T1.jsonl")
    group = parser.add_argument_group("LLM judge (judge.py; the config's judge: section)")
    group.add_argument("--judge", metavar="PREDICTIONS", default=None,
                       help="only judge an existing predictions.jsonl (with --ann: the annotation it was decoded "
                            "from) and exit; judge_scores.json goes next to it")
    group.add_argument("--judge-url", default=None, help="judge.base_url: an OpenAI-compatible endpoint, e.g. "
                                                         "http://localhost:8000/v1; the decode is then judged")
    group.add_argument("--judge-model", default=None, help="judge.model: the model name the endpoint serves")
    return parser.parse_args(argv)


def run_validation(csv_path: str, ann_path: str | None, task: str | None) -> int:
    expected = annotation_ids(read_annotation(ann_path), task) if ann_path else None
    problems = validate_submission(csv_path, expected)
    for problem in problems:
        print(problem)
    print(f"{csv_path}: {'INVALID, ' + str(len(problems)) + ' problem(s)' if problems else 'valid'}")
    return 1 if problems else 0


def run_package_validation(out_dir: str, test_jsonl: list[str]) -> int:
    if not test_jsonl:
        raise ConfigError("--validate-package needs --test-jsonl: the test files the package answers")
    return report_package(out_dir, validate_package(out_dir, test_jsonl))


def report_package(out_dir: str | Path, problems: list[str]) -> int:
    for problem in problems:
        print(problem)
    print(f"{out_dir}: {'INVALID package, ' + str(len(problems)) + ' problem(s)' if problems else 'valid package'}")
    return 1 if problems else 0


def judge_config(cfg: DictConfig, args: argparse.Namespace) -> dict:
    """The config's judge: section with --judge-url / --judge-model on top."""
    settings = dict(cfg.judge)
    if args.judge_url is not None:
        settings["base_url"] = args.judge_url
    if args.judge_model is not None:
        settings["model"] = args.judge_model
    return settings


def run_judge(args: argparse.Namespace) -> int:
    """Judge a predictions.jsonl without decoding (no model is loaded)."""
    if not args.ann:
        raise ConfigError("--judge needs --ann: the annotation file the predictions were decoded from")
    cfg = load_config(args.cfg_path or DEFAULT_CFG_PATHS, args.options)
    summary = judge_predictions(args.judge, args.ann, judge_config(cfg, args))
    print(format_judge_table(summary))
    print(f"wrote judge_scores.json to {Path(args.judge).parent}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    cfg = load_inference_config(args.cfg_path, args.options)
    ann_path = args.ann or cfg.get("datasets", {}).get("test_ann_path")
    if not ann_path:
        raise ConfigError("no annotation file: pass --ann or set datasets.test_ann_path")
    dataset = build_dataset(ann_path, cfg.get("datasets", {}), "test", cfg.model)
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    out_dir = Path(args.out_dir or Path(cfg.run.output_dir) / f"eval_{Path(ann_path).stem}")
    judge_cfg = judge_config(cfg, args)
    judging = bool(judge_cfg["base_url"] or args.judge_model)
    if judging:  # a judge that cannot run fails before the decode, not after it
        load_prompts(judge_settings(judge_cfg)["prompt_path"])
    if args.submission_dir:  # so does a package that cannot be written
        if args.limit:
            raise ConfigError("--submission-dir needs every test dialogue: drop --limit")
        check_package_dir_free(Path(args.submission_dir))
        entries = read_annotation(ann_path)
        releases_of_entries(entries)
    check_audio_readable(dataset)
    settings = generation_settings(cfg.generate, args)
    checkpoint = file_fingerprint(cfg.model.ckpt) if cfg.model.ckpt else None
    done = resume_decode(out_dir, dataset, {"annotation": str(ann_path), "limit": args.limit, "generate": settings,
                                            "lora_scaling": args.lora_scaling, "model": config_to_dict(cfg.model),
                                            "checkpoint": checkpoint})
    model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
    records = decode_remaining(out_dir, model, dataset, done, settings, inference_dtype(cfg, model),
                               args.batch_size or cfg.run.batch_size_eval,
                               cfg.run.num_workers if args.num_workers is None else args.num_workers)
    scores, counts = write_decode_outputs(records, out_dir, cfg, {"annotation": str(ann_path),
                                                                      "generate": settings})
    for path in sorted(out_dir.glob("submission_*.csv")):
        for problem in validate_submission(path):
            print(f"warning: {problem}", file=sys.stderr)
    print(format_table(scores, counts))
    print(f"wrote predictions.jsonl, submission_<task>.csv and scores.json to {out_dir}")
    if judging:
        try:
            print(format_judge_table(judge_records(records, ann_path, judge_cfg, out_dir)))
        except JudgeError as e:
            raise JudgeError(f"{e} (the decode is saved: judge it again with --judge "
                             f"{out_dir / 'predictions.jsonl'} --ann {ann_path})") from e
        print(f"wrote judge_scores.json to {out_dir}")
    if args.submission_dir:
        package = Path(args.submission_dir)
        try:
            write_package(records, entries, package, cfg.submission.tts_command)
        except PackageError as e:
            raise PackageError(f"{e} (the decode is saved in {out_dir / 'predictions.jsonl'})") from e
        return report_package(package, package_problems(package, releases_of_entries(entries)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.validate:
            return run_validation(args.validate, args.ann, args.task)
        if args.judge:
            return run_judge(args)
        if args.validate_package:
            return run_package_validation(args.validate_package, args.test_jsonl)
        return evaluate(args)
    except (ConfigError, AnnotationError, AudioError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
