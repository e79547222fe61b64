"""A web page to ask SALMONN about audio: upload or record one clip per dialogue turn, type a prompt, read the
answer as it is generated. The page names the loaded checkpoint; generation settings sit in an accordion.

    python web_demo.py                                   # tiny demo model on http://127.0.0.1:7860
    python web_demo.py --cfg-path configs/config.yaml --cfg-path configs/decode_config.yaml --port 8080
    python web_demo.py --host 0.0.0.0                    # reachable from other machines: only on a trusted network

Each upload or recording is checked as it arrives (readable audio, at most --max-seconds); uploads above
--max-file-size are refused by the page. Turns are filled in order (the prompt numbers them by position).
Messages stay in the box under the answer until the next question. One request runs at a time (the model is
shared); others wait in the queue.
"""
from __future__ import annotations

import argparse
import html
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import soundfile as sf
from omegaconf import DictConfig

from config import ConfigError
from dataset_v1 import AudioError, audio_seconds
from inference import Assistant, add_model_arguments, open_assistant, without_unused_sampling

DEFAULT_TURNS = 5  # HumDial dialogues have up to 5 user turns
DEFAULT_PROMPT = "Describe the emotion of the speaker in every turn."

CSS = """
.turn button.upload-container { min-height: 0 !important; height: 130px !important; }
#status .demo-error { color: var(--error-text-color); background: var(--error-background-fill);
                      border: 1px solid var(--error-border-color); border-radius: 6px; padding: 8px 12px; }
"""
# Gradio shows its own upload errors (an upload above --max-file-size) as a toast that fades after 10 s; this moves
# each such toast's text into a hidden textbox, whose change event puts it in the message box, where it stays.
# ("Connection Lost" toasts stay toasts: the server that would show the message is gone.)
KEEP_TOAST_ERRORS_JS = """
() => {
  new MutationObserver(() => {
    for (const toast of document.querySelectorAll('.toast-body.error:not([data-kept])')) {
      if (toast.querySelector('.toast-title')?.innerText.trim() !== 'Error') continue;
      toast.dataset.kept = 'yes';
      const box = document.querySelector('#client_error textarea');
      box.value = [...toast.querySelectorAll('[data-testid=toast-text]')].map(e => e.innerText).join(' ');
      box.dispatchEvent(new Event('input', {bubbles: true}));
      toast.querySelector('[data-testid=toast-close]').click();
    }
  }).observe(document.body, {childList: true, subtree: true});
}
"""


class RequestError(ValueError):
    """A question or upload the page refuses; the message names the turn and the file's own name."""


def with_file_names(message: str, paths: list[str]) -> str:
    """The message with each server-side temp path replaced by the file's own (uploaded) name."""
    for path in paths:
        message = message.replace(path, Path(path).name)
    return message


def turn_seconds(path: str, turn: int, max_seconds: float) -> float:
    """The turn's duration; RequestError naming the turn and file when it is not readable audio or is too long."""
    name = Path(path).name
    try:
        seconds = audio_seconds(path)
    except AudioError as e:
        reason = e.__cause__.error_string if isinstance(e.__cause__, sf.LibsndfileError) else None
        raise RequestError(f"turn {turn}: cannot read {name} as audio: {reason}" if reason else
                           f"turn {turn}: {with_file_names(str(e), [path])}") from e
    if seconds > max_seconds:
        raise RequestError(f"turn {turn} ({name}) is {seconds:.0f} s long; this demo accepts at most "
                           f"{max_seconds:.0f} s per turn")
    return seconds


def filled_turns(audios: list[str | None], max_seconds: float) -> list[str]:
    """The turns' files in slot order. The prompt numbers turns by position, so a gap (slot 3 filled, slot 2
    empty) is refused rather than renumbered; each file is checked as turn_seconds does."""
    filled = [n for n, path in enumerate(audios, start=1) if path]
    if not filled:
        raise RequestError("upload or record at least one audio turn")
    empty = [n for n in range(1, filled[-1]) if n not in filled]
    if empty:
        raise RequestError(f"turn {empty[0]} is empty: fill the turns in order (turn {filled[-1]} holds a file)")
    for turn, path in enumerate(audios[:filled[-1]], start=1):
        turn_seconds(path, turn, max_seconds)
    return audios[:filled[-1]]


def message_html(message: str) -> str:
    """The message box's content: the message in a red box, or nothing."""
    return f'<div class="demo-error">error: {html.escape(message)}</div>' if message else ""


def kept_client_error(message: str) -> tuple[Any, Any]:
    """A browser-side error (copied from its toast) into the message box; the copy is emptied so that the same
    error again is a change again."""
    return (message_html(message), "") if message else (gr.skip(), gr.skip())


def checkpoint_line(cfg: DictConfig) -> str:
    """Which weights answer: the model.ckpt path and its size, or that there is none (random Q-Former/LoRA)."""
    ckpt = cfg.model.ckpt
    if not ckpt:
        return ("**Checkpoint:** untrained model (no checkpoint: `model.ckpt` is empty), so answers do not reflect "
                "the audio.")
    return f"**Checkpoint:** `{ckpt}` ({os.path.getsize(ckpt) / 1e6:,.1f} MB)"


def turn_input(n: int) -> gr.Audio:
    return gr.Audio(sources=["upload", "microphone"], type="filepath", label=f"Turn {n}", elem_id=f"turn{n}",
                    elem_classes="turn")


def upload_checker(turn: int, max_seconds: float) -> Callable[[str | None], tuple[Any, Any]]:
    """The slot's upload/recording handler: a refused file leaves the slot empty, with the reason in the box."""
    def check(path: str | None) -> tuple[Any, Any]:
        if path:
            try:
                turn_seconds(path, turn, max_seconds)
            except RequestError as e:
                return None, message_html(f"{e} (removed: upload another file)")
        return gr.skip(), gr.skip()
    return check


def default_lora_scaling(assistant: Assistant) -> float:
    cfg = assistant.model.cfg
    return cfg["lora_scaling"] if cfg.get("lora_scaling") is not None else cfg["lora_alpha"] / cfg["lora_rank"]


def settings_inputs(defaults: dict[str, Any], lora_scaling: float, has_lora: bool) -> list[gr.components.Component]:
    """The accordion's knobs in three columns, in respond's order."""
    with gr.Row():
        with gr.Column(min_width=300):
            knobs = [gr.Slider(1, 1000, value=defaults["max_new_tokens"], step=1, label="max_new_tokens"),
                     gr.Slider(1, 8, value=defaults["num_beams"], step=1, label="num_beams",
                               info="1 streams the answer; more waits for the whole answer")]
        with gr.Column(min_width=300):
            knobs += [gr.Checkbox(value=defaults["do_sample"], label="do_sample",
                                  info="sample (temperature, top_p) instead of greedy/beam search"),
                      gr.Slider(0.05, 2.0, value=defaults["temperature"], step=0.05, label="temperature"),
                      gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="top_p")]
        with gr.Column(min_width=300):
            knobs += [gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05, label="repetition_penalty"),
                      gr.Slider(-2.0, 2.0, value=defaults["length_penalty"], step=0.1, label="length_penalty"),
                      gr.Number(value=lora_scaling, label="LoRA scaling", visible=has_lora,
                                info="lower it to bring back abilities the fine-tune suppressed")]
    return knobs


def build_demo(assistant: Assistant, max_seconds: float, lora_scaling: float | None = None,
               turns: int = DEFAULT_TURNS) -> gr.Blocks:
    """The page: turns on the left; prompt, answer and message box on the right, so the answer stays in view
    however many turns are open. The config's generate: section, with the command line's flags on top, fills
    the settings accordion. Launch it with css=CSS, js=KEEP_TOAST_ERRORS_JS."""
    defaults = {**assistant.cfg.generate, **assistant.generate_settings}
    has_lora = bool(assistant.model.cfg["lora"])

    def respond(*values: Any) -> Iterator[tuple[str, str]]:
        audios, (prompt, max_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty,
                 length_penalty, scaling) = list(values[:turns]), values[turns:]
        yield "", ""  # a new question clears the last answer and message
        try:
            wav_paths = filled_turns(audios, max_seconds)
            if not prompt or not prompt.strip():
                raise RequestError("type a prompt: a question or an instruction about the audio")
        except RequestError as e:
            yield "", message_html(str(e))
            return
        settings = without_unused_sampling({
            **assistant.generate_settings, "max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams),
            "do_sample": bool(do_sample), "temperature": float(temperature), "top_p": float(top_p),
            "repetition_penalty": float(repetition_penalty), "length_penalty": float(length_penalty)})
        if has_lora:
            assistant.model.set_lora_scaling(float(scaling))
        text = ""
        try:
            for piece in assistant.answer(wav_paths, prompt, settings):
                text += piece
                yield text, ""
        except (AudioError, FileNotFoundError, ValueError) as e:
            yield text, message_html(with_file_names(str(e), wav_paths))

    with gr.Blocks(title="SALMONN demo") as demo:
        gr.Markdown("## SALMONN\nUpload or record audio (one clip per dialogue turn, filled in order), type a "
                    "prompt, press **Ask**.")
        gr.Markdown(checkpoint_line(assistant.cfg), elem_id="checkpoint")
        with gr.Row():
            with gr.Column():
                audios = [turn_input(1)]
                with gr.Accordion(f"More turns (2-{turns}): a multi-turn dialogue", open=False,
                                  visible=turns > 1, elem_id="more_turns"):
                    audios += [turn_input(n) for n in range(2, turns + 1)]
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="prompt")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="answer")
                status = gr.HTML(elem_id="status")
                client_error = gr.Textbox(visible="hidden", elem_id="client_error")
        with gr.Accordion("Generation settings", open=False, elem_id="settings"):
            settings = settings_inputs(defaults, lora_scaling if lora_scaling is not None else
                                       (default_lora_scaling(assistant) if has_lora else 0.0), has_lora)
        for turn, audio in enumerate(audios, start=1):
            check = upload_checker(turn, max_seconds)
            audio.upload(check, inputs=audio, outputs=[audio, status], show_progress="hidden")
            audio.stop_recording(check, inputs=audio, outputs=[audio, status], show_progress="hidden")
        client_error.change(kept_client_error, inputs=client_error, outputs=[status, client_error],
                            show_progress="hidden")
        inputs = [*audios, prompt, *settings]
        ask.click(respond, inputs=inputs, outputs=[answer, status], show_progress_on=answer)
        prompt.submit(respond, inputs=inputs, outputs=[answer, status], show_progress_on=answer)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-file-size", default="20mb", help="largest upload the page accepts, e.g. 20mb")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="longest accepted turn, in seconds")
    parser.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="audio slots on the page (dialogue turns)")
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error(f"--turns must be at least 1, got {args.turns}")
    return args


def check_port_free(host: str, port: int) -> None:
    """The page's address can be bound: checked before the model loads, so a clash costs a second, not a load."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror}): another program uses the port; "
                              "pass another --port") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_port_free(args.host, args.port)
        assistant = open_assistant(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_demo(assistant, args.max_seconds, args.lora_scaling, args.turns)
    try:
        demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                       max_file_size=args.max_file_size, footer_links=[],
                                                       css=CSS, js=KEEP_TOAST_ERRORS_JS)
    except OSError as e:  # the port taken between the check and the launch
        print(f"error: cannot serve on {args.host}:{args.port} ({str(e).splitlines()[0]}): pass another --port",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
