"""Decode an annotation file in batches, score the answers and write the challenge submission.

    python evaluate.py                     # tiny demo model on data/demo/ann/test.json -> outputs/demo/eval_test/
    python evaluate.py --options model.ckpt=outputs/demo/checkpoint_best.pth --batch-size 4
    python evaluate.py --cfg-path configs/config.yaml --cfg-path configs/decode_config.yaml \\
        --options model.ckpt=outputs/finetune_humdial/checkpoint_best.pth --batch-size 8
    python evaluate.py --validate outputs/demo/eval_test/submission_emotional_trajectory.csv \\
        --ann data/demo/ann/test.json --task emotional_trajectory
    python evaluate.py --judge-url http://localhost:8000/v1 --judge-model NAME    # decode, then the LLM judge
    python evaluate.py --judge outputs/demo/eval_test/predictions.jsonl --ann data/demo/ann/test.json \\
        --judge-url http://localhost:8000/v1 --judge-model NAME                   # judge only (no model load)
    python evaluate.py --ann data/humdial_test/test.json --submission-dir outputs/HD-Track1   # + the package
    python evaluate.py --validate-package outputs/HD-Track1 --test-jsonl HD-Track1-Test/zh/HD-Track1-T1.jsonl ...
    python evaluate.py --from-predictions outputs/demo/eval_test/predictions.jsonl --ann data/humdial_test/test.json \\
        --submission-dir outputs/HD-Track1    # the package from a saved decode (no model load)
    # Nota's evaluator (audiolm-evaluator): {"annotation": [{"testset_id", "path", "task": asr|audiocaption_v2,
    # "text"?}]}, relative paths under datasets.prefix; submission_* writes the CSV, valid_* scores it
    python evaluate.py --cfg-path salmonn_eval_config.yaml --mode submission_asr --ann test_asr.json
    python evaluate.py --cfg-path salmonn_eval_config.yaml --mode valid_aac --ann valid_aac.json
    python evaluate.py --validate outputs/decode/eval_test_asr_submission_asr/submission_asr.csv --ann test_asr.json

Writes to --out-dir:
    predictions.jsonl           one line per sample: id, task, language, prompt, prediction, reference, emotions
    submission_<task>.csv       `testset_id,text`, one row per dialogue (one file per task: ids repeat across tasks)
    scores.json                 the metrics below, the generation settings and the annotation file
and prints a table of the scores. With a judge (judge.base_url or --judge-url; humdial/judge.py) also
    judge_scores.json           the judge's means per task, language and dimension, the partial challenge score
    judge_cache.jsonl           every judge reply (a rerun asks only for what is missing)
and with --submission-dir DIR the package the challenge takes (humdial/submission.py), checked before it is reported:
    DIR/<lang>/HD-Track1-T<n>.jsonl                         each test dialogue, the reply in its evaluated turn
    DIR/<lang>/HD-Track1-T3/<id>_<turn>_response.wav         Task 3 replies spoken by submission.tts_command

Metrics per (task, language), all in % (metrics.py; humdial/scoring.py adds the challenge's): `asr*` tasks get
WER (English) or CER (Chinese); every other task gets BLEU and ROUGE-L; captioning also CIDEr-D, METEOR, SPICE
and SPIDEr (each one that cannot run here is listed as unavailable, with the reason); emotion_recognition,
speaker_verification and closed-form QA accuracy; `emotional_trajectory` also gets emotion_exact and
emotion_turn_acc. The same files come out of `train.py` with `run.evaluate: true` (both write through
inference.write_decode_outputs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Subset

from config import ConfigError, config_to_dict, load_config
from dataset_v1 import AnnotationError, AudioError, SalmonnDataset, build_dataset, read_annotation
from humdial.judge import (JudgeError, format_judge_table, judge_predictions, judge_records, judge_settings,
                           load_prompts, read_predictions)
from humdial.scoring import HumDialScorer
from humdial.submission import (PackageError, check_package_dir_free, check_tts_commands, package_problems,
                                releases_of_entries, validate_package, write_package)
from inference import (DEFAULT_CFG_PATHS, add_model_arguments, annotation_ids, check_audio_readable, decode_remaining,
                       generation_settings, inference_dtype, load_inference_config, load_model, resume_decode,
                       validate_submission, write_decode_outputs)
from metrics import format_table, unavailable_scores
from utils import FolderInUse, error_message, file_fingerprint, hold_folder, resolve_device


# Nota's evaluator modes (audiolm-evaluator `--mode`): which of the annotation's tasks to decode, and whether to
# score them (valid) or only write the `testset_id,text` CSV of a blind set (submission).
NOTA_MODES = {"submission_asr": ("asr", False), "submission_aac": ("aac", False),
              "valid_asr": ("asr", True), "valid_aac": ("aac", True)}
MODE_TASKS = {"asr": ("asr",), "aac": ("audiocaption", "audiocaption_v2")}
SCORER = HumDialScorer()  # the generic metrics and the challenge's own


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--ann", default=None, help="annotation JSON to decode (default: datasets.test_ann_path)")
    parser.add_argument("--out-dir", default=None, help="default: <run.output_dir>/eval_<annotation name>")
    parser.add_argument("--batch-size", type=int, default=None, help="default: run.batch_size_eval")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers; default: run.num_workers")
    parser.add_argument("--limit", type=int, default=0, help="decode only the first N samples (0: all)")
    parser.add_argument("--mode", choices=list(NOTA_MODES), default=None,
                        help="Nota's evaluator modes: decode only the annotation's ASR (asr) or audio-captioning "
                             "(aac: audiocaption, audiocaption_v2) entries, and either write the submission CSV "
                             "without reading `text` (submission_*) or score against it (valid_*: WER; CIDEr-D, "
                             "METEOR, SPICE, SPIDEr); default: every entry, scored where it has a reference")
    parser.add_argument("--validate", metavar="CSV", default=None,
                        help="only check a submission CSV (against --ann's ids when given) and exit")
    parser.add_argument("--task", default=None, help="with --validate and --ann: the task whose ids to expect")
    parser.add_argument("--submission-dir", default=None, metavar="DIR",
                        help="also write the challenge package (<lang>/HD-Track1-T<n>.jsonl, Task 3 wavs) to this "
                             "new folder; --ann must come from convert.py")
    parser.add_argument("--from-predictions", metavar="PREDICTIONS", default=None,
                        help="with --ann and --submission-dir: write (and check) the package from a saved "
                             "predictions.jsonl, decoding nothing: a TTS failure after a long decode costs only "
                             "the TTS")
    parser.add_argument("--validate-package", metavar="DIR", default=None,
                        help="only check a package against the test JSONL files (--test-jsonl) and exit")
    parser.add_argument("--test-jsonl", nargs="+", default=[], metavar="JSONL",
                        help="with --validate-package: the release's test files, e.g. zh/HD-Track1-T1.jsonl")
    group = parser.add_argument_group("LLM judge (humdial/judge.py; the config's judge: section)")
    group.add_argument("--judge", metavar="PREDICTIONS", default=None,
                       help="only judge an existing predictions.jsonl (with --ann: the annotation it was decoded "
                            "from) and exit; judge_scores.json goes next to it")
    group.add_argument("--judge-url", default=None, help="judge.base_url: an OpenAI-compatible endpoint, e.g. "
                                                         "http://localhost:8000/v1; the decode is then judged")
    group.add_argument("--judge-model", default=None, help="judge.model: the model name the endpoint serves")
    return parser.parse_args(argv)


def run_validation(csv_path: str, ann_path: str | None, task: str | None) -> int:
    entries = read_annotation(ann_path, blind_ok=True, check_audio=False) if ann_path else None
    expected = annotation_ids(entries, task) if ann_path else None
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


def selected_samples(dataset: SalmonnDataset, ann_path: Any, mode: str | None, limit: int) -> list[int]:
    """The samples to decode: with a Nota mode, the entries of its task, their `text` blanked in submission modes
    (what a blind set gives: nothing is scored) and required in valid ones; the first `limit` (0: all)."""
    indices = list(range(len(dataset)))
    if mode:
        task, scored = NOTA_MODES[mode]
        indices = [i for i in indices if dataset.annotation[i]["task"].startswith(MODE_TASKS[task])]
        if not indices:
            tasks = sorted({entry["task"] for entry in dataset.annotation})
            raise AnnotationError(f"{ann_path}: --mode {mode} decodes the {'/'.join(MODE_TASKS[task])} entries; this "
                                  f"annotation has none (its tasks: {', '.join(tasks)})")
        for i in indices:
            entry = dataset.annotation[i]
            if scored and not entry["text"].strip():
                raise AnnotationError(f"{entry['ann_file']}: {entry['id'] if 'id' in entry else entry['path']}: "
                                      f"--mode {mode} scores against `text`, which this entry lacks (decode a "
                                      f"blind set with submission_{task})")
            if not scored:
                dataset.annotation[i] = {**entry, "text": ""}
    return indices[:limit] if limit else indices


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


def run_packaging(args: argparse.Namespace) -> int:
    """Write and check the package from saved predictions, decoding nothing (no model is loaded)."""
    if not (args.ann and args.submission_dir):
        raise ConfigError("--from-predictions needs --ann (the annotation the predictions were decoded from) and "
                          "--submission-dir (the new package folder)")
    cfg = load_config(args.cfg_path or DEFAULT_CFG_PATHS, args.options)
    entries = read_annotation(args.ann, blind_ok=True, check_audio=False)  # the package needs no audio
    return package(read_predictions(args.from_predictions), entries, Path(args.submission_dir),
                   cfg.submission.tts_command)


def package(records: list[dict], entries: list[dict], out_dir: Path, tts_commands: Any) -> int:
    """Write the package of decoded records, then check it as the validator does."""
    write_package(records, entries, out_dir, tts_commands)
    return report_package(out_dir, package_problems(out_dir, releases_of_entries(entries)))


def evaluate(args: argparse.Namespace) -> int:
    cfg = load_inference_config(args.cfg_path, args.options)
    ann_path = args.ann or cfg.get("datasets", {}).get("test_ann_path")
    if not ann_path:
        raise ConfigError("no annotation file: pass --ann or set datasets.test_ann_path")
    if args.limit < 0:
        raise ConfigError(f"--limit must be a number of samples (0: all), got {args.limit}")
    dataset = build_dataset(ann_path, cfg.get("datasets", {}), "test", cfg.model)
    dataset = Subset(dataset, selected_samples(dataset, ann_path, args.mode, args.limit))
    if not len(dataset):
        raise AnnotationError(f"{ann_path}: no entries: nothing to decode")
    name = "_".join(Path(p).stem for p in ([ann_path] if isinstance(ann_path, (str, Path)) else ann_path))
    out_dir = Path(args.out_dir or Path(cfg.run.output_dir) / f"eval_{name}{'_' + args.mode if args.mode else ''}")
    judge_cfg = judge_config(cfg, args)
    judging = bool(judge_cfg["base_url"] or args.judge_model)
    if judging:  # a judge that cannot run fails before the decode, not after it
        load_prompts(judge_settings(judge_cfg)["prompt_path"])
    if args.submission_dir:  # so does a package that cannot be written
        if args.limit:
            raise ConfigError("--submission-dir needs every test dialogue: drop --limit")
        check_package_dir_free(Path(args.submission_dir))
        entries = read_annotation(ann_path)
        check_tts_commands(releases_of_entries(entries), cfg.submission.tts_command)
    check_audio_readable(dataset)
    settings = generation_settings(cfg.generate, args)
    checkpoint = file_fingerprint(cfg.model.ckpt) if cfg.model.ckpt else None
    with hold_folder(out_dir, "evaluate.py"):  # one decode per folder: two would mix their predictions
        done = resume_decode(out_dir, dataset, {"annotation": str(ann_path), "mode": args.mode, "limit": args.limit,
                                                "generate": settings,
                                                "lora_scaling": args.lora_scaling, "model": config_to_dict(cfg.model),
                                                "checkpoint": checkpoint})
        model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
        records = decode_remaining(out_dir, model, dataset, done, settings, inference_dtype(cfg, model),
                                   args.batch_size or cfg.run.batch_size_eval,
                                   cfg.run.num_workers if args.num_workers is None else args.num_workers, SCORER)
        scores, counts = write_decode_outputs(records, out_dir, cfg, {"annotation": str(ann_path),
                                                                          "generate": settings}, SCORER)
    for path in sorted(out_dir.glob("submission_*.csv")):
        for problem in validate_submission(path):
            print(f"warning: {problem}", file=sys.stderr)
    print(format_table(scores, counts, unavailable_scores(records)))
    print(f"wrote predictions.jsonl, submission_<task>.csv and scores.json to {out_dir}")
    if judging:
        try:
            print(format_judge_table(judge_records(records, ann_path, judge_cfg, out_dir)))
        except JudgeError as e:
            raise JudgeError(f"{e} (the decode is saved: judge it again with --judge "
                             f"{out_dir / 'predictions.jsonl'} --ann {ann_path})") from e
        print(f"wrote judge_scores.json to {out_dir}")
    if args.submission_dir:
        try:
            return package(records, entries, Path(args.submission_dir), cfg.submission.tts_command)
        except PackageError as e:
            raise PackageError(f"{e} (the decode is saved: package it again with --from-predictions "
                               f"{out_dir / 'predictions.jsonl'} --ann {ann_path} --submission-dir "
                               f"{args.submission_dir})") from e
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
        if args.from_predictions:
            return run_packaging(args)
        return evaluate(args)
    except (ConfigError, AnnotationError, AudioError, FileNotFoundError, FileExistsError, ValueError,
            FolderInUse) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
