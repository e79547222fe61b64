"""Ask SALMONN about audio files from the terminal; the answer is printed as it is generated.

    python cli_inference.py                                # tiny demo model (configs/demo.yaml), interactive
    python cli_inference.py --options model.ckpt=outputs/demo/checkpoint_best.pth --wav turn1.wav \
        --wav turn2.wav --prompt "How did my emotions change?"
    python cli_inference.py --cfg-path configs/config.yaml --cfg-path configs/decode_config.yaml

Interactive loop: type one audio path per dialogue turn on the `audio>` line (separated by spaces; quote a path
that holds spaces), then the question on the `prompt>` line. `quit` or Ctrl-D exits. A missing file, unreadable
audio or empty prompt prints an error and the loop goes on.

Several --cfg-path files are merged in order (a later file wins), then --options, then the generation flags.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from config import ConfigError
from dataset_v1 import AudioError, audio_seconds
from inference import Assistant, add_model_arguments, can_stream, open_assistant

QUIT_WORDS = {"quit", "exit", "q"}


# ---------------------------------------------------------------------------------------------- the CLI
def print_answer(assistant: Assistant, wav_paths: list[str], prompt: str) -> None:
    pieces = assistant.answer(wav_paths, prompt)
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


def interactive(assistant: Assistant) -> None:
    print("Audio: one path per dialogue turn, separated by spaces. 'quit' or Ctrl-D exits.", flush=True)
    if not can_stream(assistant.generate_settings, batch_size=1):
        print(f"(num_beams={assistant.generate_settings['num_beams']}: each answer is printed when complete; "
              "--num-beams 1 streams it)", flush=True)
    while True:
        try:
            wav_paths = shlex.split(read_turn("audio> "))
            for path in wav_paths:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"audio file not found: {path}")
            if not wav_paths:
                raise ValueError("no audio file given: enter one path per dialogue turn")
            print_answer(assistant, wav_paths, read_turn("prompt> "))
        except EOFError:
            print(flush=True)
            return
        # AudioError and PromptError are ValueErrors; shlex raises ValueError on an unclosed quote.
        except (AudioError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--wav", action="extend", nargs="+", default=[], metavar="AUDIO",
                        help="one-shot mode: an audio file per dialogue turn, in order (several after one flag, or "
                             "the flag repeated); needs --prompt")
    parser.add_argument("--prompt", default=None, help="one-shot mode: the question about the audio")
    args = parser.parse_args(argv)
    if bool(args.wav) != (args.prompt is not None):
        parser.error("one-shot mode needs both --wav and --prompt (or neither, for the interactive loop)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for path in args.wav:  # one-shot input is checked before the (possibly minutes-long) model load
            audio_seconds(path)
    except AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        assistant = open_assistant(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.wav:
            print_answer(assistant, args.wav, args.prompt)
        else:
            interactive(assistant)
    except (AudioError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
