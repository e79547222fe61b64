"""Ask SALMONN about audio files from the terminal; the answer is printed as it is generated.

    python cli_inference.py                                # tiny demo model (configs/demo.yaml), interactive
    python cli_inference.py --options model.ckpt=outputs/demo/checkpoint_best.pth --wav turn1.wav \
        --wav turn2.wav --prompt "How did my emotions change?"
    python cli_inference.py --cfg-path configs/finetune_humdial.yaml --cfg-path configs/decode_config.yaml

Interactive loop: type one audio path per dialogue turn on the `audio>` line (separated by spaces; quote a path
that holds spaces), then the question on the `prompt>` line. `quit` or Ctrl-D exits. A missing file, unreadable
audio or empty prompt prints an error and the loop goes on.

Several --cfg-path files are merged in order (a later file wins), then --options, then the generation flags.
This module also holds the helpers the web demo, evaluate.py and the benchmark share: config, device, model
loading and streamed generation.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TextIteratorStreamer

from dataset_v1 import AudioError, load_feature_extractor, make_batch
from metrics import is_chinese
from models.salmonn import SALMONN
from utils import ConfigError, load_config, seed_everything

DEFAULT_CFG_PATHS = ["configs/demo.yaml"]
QUIT_WORDS = {"quit", "exit", "q"}

# generate: keys settable from the command line (HF GenerationConfig names) and their types.
GENERATION_FLAGS: dict[str, type] = {
    "max_new_tokens": int, "num_beams": int, "temperature": float, "top_p": float,
    "repetition_penalty": float, "length_penalty": float, "min_length": int,
}
SAMPLING_ONLY = ("temperature", "top_p")


# ---------------------------------------------------------------------------------------------- shared helpers
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--cfg-path/--options/--device/--lora-scaling and one flag per generation setting."""
    parser.add_argument("--cfg-path", action="append", metavar="YAML",
                        help="config file(s), merged in order (a model config, then e.g. configs/decode_config.yaml); "
                             "default: " + " + ".join(DEFAULT_CFG_PATHS))
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. model.ckpt=outputs/run/checkpoint_best.pth")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--lora-scaling", type=float, default=None,
                        help="inference LoRA scaling (default alpha/rank); lower it to bring back abilities the "
                             "fine-tune suppressed")
    group = parser.add_argument_group("generation (override the config's generate: section)")
    for key, kind in GENERATION_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None)
    group.add_argument("--do-sample", dest="do_sample", action=argparse.BooleanOptionalAction, default=None)


def load_inference_config(cfg_paths: list[str] | None, options: list[str]) -> DictConfig:
    """The merged, validated config of one or more YAML files; it must describe a model."""
    paths = cfg_paths or DEFAULT_CFG_PATHS
    cfg = load_config(paths, options)
    if "model" not in cfg:
        raise ConfigError(f"no `model:` section in {' + '.join(paths)}: add the model's config, e.g. "
                          f"--cfg-path configs/demo.yaml --cfg-path {paths[-1]}")
    return cfg


def generation_settings(generate_cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The config's generate: section with the flags that were given on top."""
    settings = dict(OmegaConf.to_container(generate_cfg, resolve=True))
    for key in [*GENERATION_FLAGS, "do_sample"]:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return without_unused_sampling(settings)


def without_unused_sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """Sampling knobs dropped when not sampling: they would do nothing but make transformers warn."""
    if settings.get("do_sample"):
        return settings
    return {k: v for k, v in settings.items() if k not in SAMPLING_ONLY}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible")
    return device


def load_model(cfg: DictConfig, device: torch.device, lora_scaling: float | None = None):
    """SALMONN from the `model:` section, on `device`, in eval mode. Missing weights raise FileNotFoundError
    naming what to download where. Seeded by run.seed: the random-init demo model and sampling repeat."""
    seed_everything(cfg.run.seed)
    model = SALMONN.from_config(cfg.model)
    if lora_scaling is not None:
        model.set_lora_scaling(lora_scaling)
    return model.to(device).eval()


def autocast_for(model) -> Any:
    """Half-precision LLMs on GPU run under autocast (the trained tensors stay fp32), as in training."""
    if model.device.type == "cuda" and model.llm_dtype != torch.float32:
        return torch.autocast("cuda", dtype=model.llm_dtype)
    return nullcontext()


def can_stream(generate_settings: dict[str, Any], batch_size: int) -> bool:
    """HF streamers follow one hypothesis: batch size 1 without beam search."""
    return batch_size == 1 and generate_settings.get("num_beams", 1) == 1


def stream_answer(model, batch: dict[str, Any], generate_settings: dict[str, Any]) -> Iterator[str]:
    """Text pieces of the answer as they are generated (one piece with beam search, which cannot stream).

    The pieces join to the model's final answer up to surrounding whitespace."""
    if not can_stream(generate_settings, len(batch["prompt"])):
        with autocast_for(model):
            yield model.generate(batch, generate_settings)[0]
        return
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with autocast_for(model):  # autocast is per thread
                model.generate(batch, generate_settings, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread below, then re-raised
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = False
    for piece in streamer:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece
    thread.join()
    if failure:
        raise failure[0]


def language_of(prompt: str) -> str:
    """Turn labels follow the prompt's language: Chinese prompts get 第n轮, others Turn n."""
    return "zh" if is_chinese(prompt) else "en"


class Session:
    """A loaded model with its feature extractor, prompt template and generation settings."""

    def __init__(self, model, cfg: DictConfig, generate_settings: dict[str, Any]):
        self.model = model
        self.generate_settings = generate_settings
        self.template = cfg.model.prompt_template or "USER: {}\nASSISTANT:"
        whisper_path = cfg.get("datasets", {}).get("whisper_path") or cfg.model.whisper_path
        self.feature_extractor = load_feature_extractor(whisper_path)

    def batch(self, wav_paths: list[str], prompt: str) -> dict[str, Any]:
        """A one-sample batch; AudioError/FileNotFoundError/ValueError say what is wrong with the input."""
        if not wav_paths:
            raise ValueError("no audio file given: enter one path per dialogue turn")
        if not prompt.strip():
            raise ValueError("empty prompt: type a question or an instruction about the audio")
        return make_batch(wav_paths, prompt.strip(), self.feature_extractor, template=self.template,
                          language=language_of(prompt))

    def answer(self, wav_paths: list[str], prompt: str,
               generate_settings: dict[str, Any] | None = None) -> Iterator[str]:
        """The answer's text pieces, with the session's generation settings unless others are given."""
        yield from stream_answer(self.model, self.batch(wav_paths, prompt),
                                 generate_settings or self.generate_settings)


# ---------------------------------------------------------------------------------------------- the CLI
def print_answer(session: Session, wav_paths: list[str], prompt: str) -> None:
    pieces = session.answer(wav_paths, prompt)
    first = next(pieces, "")  # input errors surface here, before the "answer:" label is printed
    print("answer: " + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)


def read_turn(prompt: str) -> str:
    """One line of input; EOFError (Ctrl-D) ends the session, as does a quit word."""
    line = input(prompt)
    if line.strip().lower() in QUIT_WORDS:
        raise EOFError
    return line


def interactive(session: Session) -> None:
    print("Audio: one path per dialogue turn, separated by spaces. 'quit' or Ctrl-D exits.", flush=True)
    if not can_stream(session.generate_settings, batch_size=1):
        print(f"(num_beams={session.generate_settings['num_beams']}: each answer is printed when complete; "
              "--num-beams 1 streams it)", flush=True)
    while True:
        try:
            wav_paths = shlex.split(read_turn("audio> "))
            for path in wav_paths:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"audio file not found: {path}")
            if not wav_paths:
                raise ValueError("no audio file given: enter one path per dialogue turn")
            print_answer(session, wav_paths, read_turn("prompt> "))
        except EOFError:
            print(flush=True)
            return
        # AudioError and PromptError are ValueErrors; shlex raises ValueError on an unclosed quote.
        except (AudioError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--wav", action="append", default=[], metavar="AUDIO",
                        help="one-shot mode: an audio file per dialogue turn (repeat the flag); needs --prompt")
    parser.add_argument("--prompt", default=None, help="one-shot mode: the question about the audio")
    args = parser.parse_args(argv)
    if bool(args.wav) != (args.prompt is not None):
        parser.error("one-shot mode needs both --wav and --prompt (or neither, for the interactive loop)")
    return args


def open_session(args: argparse.Namespace) -> Session | None:
    """Config + model + generation settings from the shared flags; None (after saying why) when they fail."""
    try:
        cfg = load_inference_config(args.cfg_path, args.options)
        model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
        return Session(model, cfg, generation_settings(cfg.generate, args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = open_session(args)
    if session is None:
        return 2
    try:
        if args.wav:
            print_answer(session, args.wav, args.prompt)
        else:
            interactive(session)
    except (AudioError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
