"""The config: one YAML per experiment with `model:`, `datasets:`, `run:` and `generate:` sections (the original
SALMONN layout), `judge:` (the LLM judge) and `submission:` (the challenge package), checked against SCHEMA,
the one home of every key's default and allowed values.

`load_config` merges several files and `--options a.b=c` overrides, checks every key (a misspelt key fails at
start, naming the closest known key) and fills defaults. Light to import: the standard library, omegaconf and
the model's defaults (models/__init__.py), so reading a config never loads torch, transformers or the model.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models import MODEL_DEFAULTS, model_settings


class ConfigError(ValueError):
    """A config that cannot be run: unknown, missing, retired or mistyped key."""


REQUIRED = "???"  # OmegaConf's marker for a value that must be given

# Every known key per section with its default. A nested dict is a sub-section (run.optims).
# A default of None accepts any type; otherwise the value must have the default's type (int is accepted
# where a float is expected).
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {**MODEL_DEFAULTS, "whisper_path": REQUIRED},
    "datasets": {
        # annotation JSON, or a list of them (read in order, one split): convert.py's, the original SALMONN's
        # ({"annotation": [{path, text, task?, Q?, expand_wav?}]}) or Nota's (with testset_id)
        "train_ann_path": "",
        "valid_ann_path": "",
        "test_ann_path": "",
        "prefix": "",  # the audio root of relative audio paths ('' = each annotation file's folder); the original
                       # and Nota's key. `data_prefix` is read as the same key
        "data_prefix": "",
        "turn_mode": "per_turn",  # per_turn: one <SpeechHere> slot per user turn | concat: the original fine-tune
                                  # | packed: per-turn slots, the turns laid end to end in shared 30 s clips on
                                  # Q-Former window boundaries (needs second_stride == second_per_window)
        "text_inputs": "audio",  # audio | audio+transcript | audio+transcript+replies
        "concat_gap_s": 0.5,  # silence between turns in concat mode
        "silence_audio": False,  # ablation: every clip replaced by zeros of the same length
        # None = the model section's value
        "whisper_path": None,
        "prompt_path": None,
        "test_prompt_path": None,
        "prompt_template": None,
    },
    "run": {
        "seed": 42,
        "output_dir": "outputs/run",
        "evaluate": False,  # only decode the test split to <output_dir>/predictions_test.json
        "resume": "",  # '' | 'auto' (latest checkpoint in output_dir) | path to a checkpoint
        "device": "auto",  # auto (cuda if available) | cuda | cpu
        "precision": "auto",  # auto (bf16 on GPUs that support it, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
        "amp": None,  # the original's switch for mixed precision: true = precision auto, false = fp32
        # The original's launch keys, checked against torchrun's environment when torchrun started the script (a
        # contradiction is an error); null = whatever torchrun says. Without torchrun: one process, as the original
        "use_distributed": None,
        "world_size": None,
        "dist_url": None,  # env:// (torchrun's rendezvous)
        "fsdp": False,  # shard the model over the ranks (LLMs that do not fit one GPU)
        "gradient_checkpointing": False,  # the LLM recomputes its layers' activations in the backward pass
                                          # (non-reentrant): less memory, one more LLM forward per step
        "padding_free": False,  # training forward: the micro-batch's sequences in one row, positions restarting
                                # per sample, no padding (a block-diagonal causal mask; flash-attention varlen);
                                # same loss. Generation stays left-padded
        "log_freq": 5,
        "epoch_based": False,  # True: an epoch is one pass over the training data
        "iters_per_epoch": 3000,  # optimizer steps per epoch when epoch_based is False
        "accum_grad_iters": 1,
        "batch_size_train": 8,  # per process
        "batch_size_eval": 8,
        "num_workers": 4,
        "group_by_length": False,  # batches of samples of alike audio length: less padding, faster steps
        "grad_clip": 1.0,  # max global grad norm; 0 = no clipping
        "nonfinite_loss": "stop",  # stop | skip (skip the step and count it)
        "valid_every_steps": 0,  # 0 = validate at the end of each epoch only
        "valid_decode_samples": 0,  # decode this many validation samples and score them with metrics.py
        "alignment_check": True,  # ASR samples among them are decoded again with their audio silenced
                                  # (silenced/<task>/<lang>/wer|cer): an unaligned connector scores the same
        "best_metric": "acc",  # a validation metric: loss, acc, or a decode score `<task>/<lang>/<metric>` (asr/en/wer)
        "best_metric_mode": "max",  # max | min
        "save_every_steps": 0,  # 0 = checkpoint at the end of each epoch only
        "keep_last": 2,  # step/epoch checkpoints kept besides checkpoint_best.pth
        "optims": {
            "max_epoch": 30,
            "warmup_steps": 3000,
            "warmup_start_lr": 1e-6,
            "init_lr": 3e-5,
            "min_lr": 1e-5,
            "weight_decay": 0.05,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
        },
    },
    "generate": {
        "max_new_tokens": 200,
        "num_beams": 4,
        "do_sample": False,
        "min_length": 1,
        "temperature": 1.0,
        "top_p": 0.9,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
    },
    "judge": {  # the LLM judge of Tasks 1-3 (humdial/judge.py), any OpenAI-compatible chat-completions endpoint
        "base_url": "",  # e.g. http://localhost:8000/v1 (vllm serve); '' = no judging unless --judge-url
        "model": "",  # the model name the endpoint serves (vllm serve --served-model-name)
        "api_key_env": "",  # environment variable holding the API key; '' = "EMPTY" (vLLM without --api-key)
        "temperature": 0.6,  # the challenge's sampling settings
        "top_p": 0.95,
        "top_k": 20,  # sent in the request body as vLLM takes it
        "max_tokens": 1024,
        "timeout": 120.0,  # seconds per request
        "max_retries": 5,  # on connection errors, timeouts, 429 and 5xx, with exponential back-off
        "concurrency": 8,  # requests in flight
        "prompt_path": "prompts/judge_prompts.json",
        "cache_path": "",  # JSONL of judge replies; '' = judge_cache.jsonl next to the predictions
    },
    "submission": {  # the challenge package (evaluate.py --submission-dir; humdial/submission.py)
        # Task 3 replies are spoken by this command per language: a template with {text} and {out} (the wav to
        # write), split like a shell line but run without one; {text} comes after `--` (end of options) or as
        # --option={text}, so a reply is never read as an option (checked). espeak-ng is the offline default; a
        # competitive entry needs a neural open-source TTS (the organisers forbid commercial ones).
        "tts_command": {
            "zh": "espeak-ng -v cmn -w {out} -- {text}",
            "en": "espeak-ng -v en-us -w {out} -- {text}",
        },
    },
}

# Keys of the original SALMONN configs that this repo does not use, and what to do instead.
RETIRED: dict[str, str] = {
    "run.gpu": "torchrun sets LOCAL_RANK; remove the key",
    "run.job_name": "use run.output_dir",
    "run.exp_name": "Nota's wandb run name: this repo logs to TensorBoard in run.output_dir; remove the key",
    "model.device_8bit": "8-bit loading is not supported; remove the key",
    "model.token": "models load from local folders only, nothing is fetched from a hub: remove the key",  # Nota's
    "model.only_preprocessor": "the model always loads whole: remove the key",  # Nota's
    "generate.end_sym": "model.end_sym ends both the training targets and generation: set it there",  # Nota's
}

# Keys whose value must be one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.torch_dtype": ("float32", "bfloat16", "float16"),
    "model.chat_template": ("auto", "prompt_template"),
    "datasets.turn_mode": ("per_turn", "concat", "packed"),
    "datasets.text_inputs": ("audio", "audio+transcript", "audio+transcript+replies"),
    "run.device": ("auto", "cuda", "cpu"),
    "run.precision": ("auto", "bf16", "fp16", "fp32"),
    "run.nonfinite_loss": ("stop", "skip"),
    "run.best_metric_mode": ("max", "min"),
}

# Keys whose value must lie in an interval ("[" and "]" include the end, "(" and ")" exclude it): a value of the
# right type that makes no sense (a batch of 0, grad_clip < 0 = gradient ascent, max_epoch 0 = nothing trained,
# init_lr 0) fails at load, before any model is built.
RANGES: dict[str, str] = {
    **{f"run.{key}": "[1, inf)" for key in ("batch_size_train", "batch_size_eval", "accum_grad_iters",
                                            "iters_per_epoch", "log_freq", "keep_last")},
    **{f"run.{key}": "[0, inf)" for key in ("num_workers", "grad_clip", "valid_every_steps", "valid_decode_samples",
                                            "save_every_steps", "optims.warmup_steps", "optims.warmup_start_lr",
                                            "optims.min_lr", "optims.weight_decay")},
    "run.optims.max_epoch": "[1, inf)",
    "run.optims.init_lr": "(0, inf)",
    "run.optims.eps": "(0, inf)",
    "run.optims.beta1": "[0, 1)",
    "run.optims.beta2": "[0, 1)",
    "generate.max_new_tokens": "[1, inf)",
    "generate.num_beams": "[1, inf)",
    "generate.min_length": "[0, inf)",
    "generate.temperature": "(0, inf)",
    "generate.top_p": "(0, 1]",
    "generate.repetition_penalty": "(0, inf)",
    "judge.max_tokens": "[1, inf)",
    "judge.timeout": "(0, inf)",
    "judge.max_retries": "[0, inf)",
    "judge.concurrency": "[1, inf)",
}
# Keys that must not be empty.
NON_EMPTY = ("run.output_dir",)

# Keys that take one annotation file or a list of them (read in order as one split).
ANN_PATH_KEYS = ("datasets.train_ann_path", "datasets.valid_ann_path", "datasets.test_ann_path")

# Sections that are always present (filled with defaults when the file has none).
ALWAYS_PRESENT = ("run", "generate", "judge", "submission")


def add_config_arguments(parser: argparse.ArgumentParser, cfg_help: str, required: bool = False) -> None:
    """--cfg-path and --options for a script. Both repeat: the files merge in the order given, then every
    KEY=VALUE in the order given (a later one wins), so nothing typed is dropped."""
    parser.add_argument("--cfg-path", action="extend", nargs="+", required=required, metavar="YAML", help=cfg_help)
    parser.add_argument("--options", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable), e.g. run.batch_size_train=4 model.ckpt=PATH")


def load_config(cfg_path: str | list[str], options: list[str] | None = None,
                required_sections: tuple[str, ...] = ()) -> DictConfig:
    """Read a YAML config (several are merged in order, a later file winning), apply `key=value` overrides,
    validate it against SCHEMA and fill defaults.

    Raises ConfigError naming the offending key (with the closest known key for a misspelling).
    """
    paths = [cfg_path] if isinstance(cfg_path, (str, os.PathLike)) else list(cfg_path)
    files = [_read_yaml(path) for path in map(Path, paths)]
    user = OmegaConf.merge(*files, _parse_options(options or []))
    try:
        user_dict = OmegaConf.to_container(user, resolve=True)
    except OmegaConfBaseException as e:  # a ${...} that names no key, or a bad resolver
        raise ConfigError(f"config key `{e.full_key}`: {str(e).splitlines()[0]}") from e

    resolved: dict[str, Any] = {}
    _check_unknown(user_dict, SCHEMA, prefix="")
    for section, schema in SCHEMA.items():
        if section in user_dict:
            given = user_dict[section] if user_dict[section] is not None else {}
            resolved[section] = _fill_section(given, schema, prefix=section)
            if section == "model":
                resolved[section] = with_llm_path(resolved[section], required=True)
            if section == "datasets":
                resolved[section] = with_prefix(resolved[section])
        elif section in ALWAYS_PRESENT:
            resolved[section] = _fill_section({}, schema, prefix=section)
    resolved["run"] = with_original_run_keys(resolved["run"], (user_dict.get("run") or {}).get("precision"))
    for section in required_sections:
        if section not in resolved:
            raise ConfigError(f"{' + '.join(map(str, paths))}: the `{section}:` section is required")
    return OmegaConf.create(resolved)


def _read_yaml(path: Path) -> DictConfig:
    """One config file; a YAML mistake (syntax, a duplicate key, a tab) is an error naming its file and line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable YAML file: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded


def _parse_options(options: list[str]) -> DictConfig:
    """`["a.b=c", ...]` -> config; values are parsed as YAML (numbers, bools, lists)."""
    for option in options:
        key = option.partition("=")[0]
        if "=" not in option or not key or "" in key.split("."):
            raise ConfigError(f"--options expects key=value (e.g. run.seed=1), got {option!r}")
        try:
            OmegaConf.from_dotlist([option])
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"--options {option!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from e
    # `key=` sets the empty string (model.ckpt= : no checkpoint), not YAML's null
    return OmegaConf.from_dotlist([f"{o}''" if o.endswith("=") else o for o in options])


def _check_unknown(given: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    """Fail on the first key that the schema does not know, suggesting the closest known one."""
    for key, value in given.items():
        name = f"{prefix}{key}"
        if name in RETIRED:
            raise ConfigError(f"config key `{name}` is not used by this repo: {RETIRED[name]}")
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key `{name}`{hint} (known keys here: {known})")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key `{name}` must be a section (a mapping), got {value!r}")
            _check_unknown(value, schema[key], prefix=f"{name}.")


def _fill_section(given: dict[str, Any], schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Merge `given` over the defaults, failing on a missing required key or a mistyped value."""
    out: dict[str, Any] = {}
    for key, default in schema.items():
        name = f"{prefix}.{key}"
        if isinstance(default, dict):
            out[key] = _fill_section(given.get(key) or {}, default, prefix=name)
            continue
        value = given.get(key, default)
        if value is None and isinstance(default, str):  # `ckpt:` or `model.ckpt=` with nothing after: empty
            value = ""
        if value == REQUIRED:
            raise ConfigError(f"required config key `{name}` is missing")
        _check_type(name, value, default)
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"config key `{name}` must be one of {', '.join(CHOICES[name])}, got {value!r}")
        if name in RANGES and not _in_interval(value, RANGES[name]):
            raise ConfigError(f"config key `{name}` must be in {RANGES[name]}, got {value!r}")
        if name in NON_EMPTY and not str(value).strip():
            raise ConfigError(f"config key `{name}` must not be empty")
        out[key] = value
    return out


def _in_interval(value: float, interval: str) -> bool:
    """Whether value lies in an interval written "[low, high)" ("[" and "]" include the end)."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = low <= value if interval[0] == "[" else low < value
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_type(name: str, value: Any, default: Any) -> None:
    if default is None or default == REQUIRED:
        return
    if name in ANN_PATH_KEYS and isinstance(value, list):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"config key `{name}` must be a file or a non-empty list of files, got {value!r}")
        return
    expected = type(default)
    if value is None:
        raise ConfigError(f"config key `{name}` must be {expected.__name__}, got null")
    ok = isinstance(value, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is int and isinstance(value, bool):
        ok = False
    if not ok:
        raise ConfigError(f"config key `{name}` must be {expected.__name__}, got {value!r} ({type(value).__name__})")


def config_to_dict(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    """Plain-Python copy of a config (for checkpoints, which load with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)




def section_defaults(section: str, given: Any = None) -> dict[str, Any]:
    """A section's defaults with the keys of `given` (a mapping, possibly partial) on top: for code that takes one
    section without going through load_config (tests, library callers)."""
    if section == "model":
        return with_llm_path({} if given is None else dict(given))
    given = {} if given is None else dict(given)
    unknown = sorted(set(given) - set(SCHEMA[section]))
    if unknown:
        raise ConfigError(f"unknown {section} key(s): {', '.join(unknown)}")
    filled = {**SCHEMA[section], **given}
    return with_prefix(filled) if section == "datasets" else filled


def with_llm_path(model: dict[str, Any], required: bool = False) -> dict[str, Any]:
    """The model section as the model takes it (models.model_settings: defaults filled, `llm_path` read from
    `llama_path`, the original's name for it), its mistakes as ConfigError."""
    try:
        model = model_settings(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if required and not model["llm_path"]:
        raise ConfigError("required config key `model.llm_path` is missing (the LLM folder; `model.llama_path` in "
                          "the original's configs)")
    return model


def with_prefix(datasets: dict[str, Any]) -> dict[str, Any]:
    """The datasets section with `data_prefix` (a name Nota's README uses) read as `prefix`: the code reads prefix
    alone."""
    prefix, data_prefix = datasets.get("prefix") or "", datasets.get("data_prefix") or ""
    if prefix and data_prefix and prefix != data_prefix:
        raise ConfigError(f"datasets.prefix ({prefix!r}) and datasets.data_prefix ({data_prefix!r}) name different "
                          "audio roots: give one of them")
    return {**datasets, "prefix": prefix or data_prefix, "data_prefix": ""}


def with_original_run_keys(run: dict[str, Any], given_precision: str | None) -> dict[str, Any]:
    """The run section with the original's `amp` turned into `precision` (the code reads precision alone: amp
    true = auto, the half precision of the GPU, fp32 on a CPU as the original's CUDA-only autocast; false = fp32)
    and its launch keys type-checked (utils.init_distributed checks them against torchrun's environment)."""
    for key, kind in (("amp", bool), ("use_distributed", bool), ("world_size", int), ("dist_url", str)):
        value = run[key]
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ConfigError(f"config key `run.{key}` must be {kind.__name__}, got {value!r}")
    if run["world_size"] is not None and run["world_size"] < 1:
        raise ConfigError(f"config key `run.world_size` must be >= 1, got {run['world_size']}")
    amp = run["amp"]
    if amp is None:
        return run
    if given_precision is not None and (given_precision == "fp32") == amp:
        raise ConfigError(f"run.amp: {str(amp).lower()} and run.precision: {given_precision} disagree: give one of "
                          "them (amp true = precision auto, amp false = precision fp32)")
    return {**run, "precision": given_precision or ("auto" if amp else "fp32"), "amp": None}
