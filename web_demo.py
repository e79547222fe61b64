"""A web page to ask SALMONN about audio: upload or record one or more dialogue turns, type a prompt, read the
answer as it is generated. Generation settings sit in an accordion.

    python web_demo.py                                   # tiny demo model on http://127.0.0.1:7860
    python web_demo.py --cfg-path configs/finetune_humdial.yaml --cfg-path configs/decode_config.yaml --port 8080
    python web_demo.py --host 0.0.0.0                    # reachable from other machines: only on a trusted network

Uploads above --max-file-size are refused by the page; turns longer than --max-seconds are refused with a
message. One request runs at a time (the model is shared); others wait in the queue.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import gradio as gr
import soundfile as sf

from config import ConfigError
from dataset_v1 import AudioError
from inference import Assistant, add_model_arguments, open_assistant, without_unused_sampling

MAX_TURNS = 4
DEFAULT_PROMPT = "Describe the emotion of the speaker in every turn."


def check_durations(wav_paths: list[str], max_seconds: float) -> None:
    """Refuses turns longer than max_seconds before any decoding work."""
    for turn, path in enumerate(wav_paths, start=1):
        try:
            seconds = sf.info(path).duration
        except (sf.LibsndfileError, RuntimeError):
            continue  # unreadable: load_audio reports it, naming the file
        if seconds > max_seconds:
            raise gr.Error(f"Turn {turn} is {seconds:.0f} s long; this demo accepts at most {max_seconds:.0f} s "
                           "per turn.")


def turn_input(n: int) -> gr.Audio:
    return gr.Audio(sources=["upload", "microphone"], type="filepath", label=f"Turn {n}", elem_id=f"turn{n}")


def default_lora_scaling(assistant: Assistant) -> float:
    cfg = assistant.model.cfg
    return cfg["lora_scaling"] if cfg.get("lora_scaling") is not None else cfg["lora_alpha"] / cfg["lora_rank"]


def build_demo(assistant: Assistant, max_seconds: float, lora_scaling: float | None = None) -> gr.Blocks:
    """The page. The config's generate: section, with the command line's flags on top, fills the accordion."""
    defaults = {**assistant.cfg.generate, **assistant.generate_settings}
    has_lora = bool(assistant.model.cfg["lora"])

    def respond(*values: Any) -> Iterator[str]:
        audios, (prompt, max_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty,
                 length_penalty, scaling) = values[:MAX_TURNS], values[MAX_TURNS:]
        wav_paths = [a for a in audios if a]
        if not wav_paths:
            raise gr.Error("Upload or record at least one audio turn.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt: a question or an instruction about the audio.")
        check_durations(wav_paths, max_seconds)
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
                yield text
        except (AudioError, FileNotFoundError, ValueError) as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title="SALMONN demo") as demo:
        gr.Markdown("## SALMONN\nUpload or record audio (one clip per dialogue turn), type a prompt, press **Ask**.")
        with gr.Row():
            with gr.Column():
                audios = [turn_input(1)]
                with gr.Accordion("More turns (a multi-turn dialogue)", open=False):
                    audios += [turn_input(n) for n in range(2, MAX_TURNS + 1)]
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="prompt")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="answer")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                settings = [
                    gr.Slider(1, 1000, value=defaults["max_new_tokens"], step=1, label="max_new_tokens"),
                    gr.Slider(1, 8, value=defaults["num_beams"], step=1,
                              label="num_beams (1 streams the answer; more waits for the whole answer)"),
                    gr.Checkbox(value=defaults["do_sample"], label="do_sample"),
                    gr.Slider(0.05, 2.0, value=defaults["temperature"], step=0.05, label="temperature"),
                    gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="top_p"),
                    gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05,
                              label="repetition_penalty"),
                    gr.Slider(-2.0, 2.0, value=defaults["length_penalty"], step=0.1, label="length_penalty"),
                    gr.Number(value=lora_scaling if lora_scaling is not None else
                              (default_lora_scaling(assistant) if has_lora else 0.0),
                              label="LoRA scaling (lower it to bring back abilities the fine-tune suppressed)",
                              visible=has_lora),
                ]
        inputs = [*audios, prompt, *settings]
        ask.click(respond, inputs=inputs, outputs=answer)
        prompt.submit(respond, inputs=inputs, outputs=answer)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-file-size", default="20mb", help="largest upload the page accepts, e.g. 20mb")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="longest accepted turn, in seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        assistant = open_assistant(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_demo(assistant, args.max_seconds, args.lora_scaling)
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                   max_file_size=args.max_file_size, footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
