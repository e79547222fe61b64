"""cli_inference.py: the interactive loop survives bad input, streaming gives the final answer, flags apply."""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_inference
import inference
from inference import Assistant, generation_settings, load_inference_config, load_model

REPO = Path(__file__).resolve().parent.parent
GREEDY = {"num_beams": 1, "max_new_tokens": 8}


def demo_wavs(n: int) -> list[str]:
    """The first n turns of the demo test set (absolute paths)."""
    ann_path = REPO / "data/demo/ann/test.json"
    entry = json.loads(ann_path.read_text())["annotation"][0]
    return [str((ann_path.parent / turn["path"]).resolve()) for turn in entry["turns"][:n]]


@pytest.fixture(scope="module")
def session():
    cfg = load_inference_config([str(REPO / "configs/demo.yaml")], [])
    cfg.model.llm_path, cfg.model.whisper_path, cfg.model.beats_path = (
        str(REPO / cfg.model.llm_path), str(REPO / cfg.model.whisper_path), str(REPO / cfg.model.beats_path))
    return Assistant(load_model(cfg, torch.device("cpu")), cfg, dict(GREEDY))


def test_interactive_loop_reports_bad_input_and_goes_on(tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    wav = demo_wavs(1)[0]
    stdin = "\n".join([
        "missing.wav",                  # missing file
        str(not_audio), "hello",        # unreadable audio
        wav, "   ",                     # empty prompt
        '"unclosed',                    # bad quoting
        wav, "What is the emotion?",    # a real answer
        "quit",
    ]) + "\n"
    proc = subprocess.run([sys.executable, "cli_inference.py", "--num-beams", "1", "--max-new-tokens", "6"],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == "error: audio file not found: missing.wav"
    assert errors[1].startswith(f"error: cannot read audio file {not_audio}")
    assert errors[2].startswith("error: empty prompt")
    assert errors[3] == "error: No closing quotation"
    assert len(errors) == 4
    assert proc.stdout.count("answer: ") == 1
    assert "Traceback" not in proc.stderr


def test_ctrl_d_ends_the_loop(session, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{demo_wavs(1)[0]}\n"))  # EOF at the prompt line
    cli_inference.interactive(session)
    assert "answer:" not in capsys.readouterr().out


def test_several_turns_in_one_line(session, monkeypatch, capsys):
    first, second = demo_wavs(2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first} '{second}'\nHow did my emotions change?\n"))
    cli_inference.interactive(session)
    assert capsys.readouterr().out.count("answer: ") == 1


def test_streamed_text_equals_the_final_answer(session):
    wavs = demo_wavs(3)
    streamed = list(session.answer(wavs, "How did my emotions change?"))
    final = session.model.generate(session.batch(wavs, "How did my emotions change?"), GREEDY)[0]
    assert "".join(streamed).strip() == final
    assert final, "the demo model should say something in 8 tokens"


def test_beam_search_gives_one_piece_equal_to_generate(session):
    wav = demo_wavs(1)
    beam = {"num_beams": 2, "max_new_tokens": 5}
    pieces = list(inference.stream_answer(session.model, session.batch(wav, "Describe it."), beam))
    assert pieces == [session.model.generate(session.batch(wav, "Describe it."), beam)[0]]


def test_one_shot_mode(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = cli_inference.main(["--wav", demo_wavs(1)[0], "--wav", demo_wavs(2)[1], "--prompt", "Summarise.",
                             "--num-beams", "1", "--max-new-tokens", "4", "--lora-scaling", "0.5"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("answer: ")


def test_one_shot_missing_audio_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = cli_inference.main(["--wav", "nowhere.wav", "--prompt", "hi", "--max-new-tokens", "2"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == "error: audio file not found: nowhere.wav"


def test_real_model_without_weights_names_what_to_download(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = cli_inference.main(["--cfg-path", "configs/config.yaml", "--cfg-path", "configs/decode_config.yaml",
                             "--wav", demo_wavs(1)[0], "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "Download" in err and "Traceback" not in err


def test_the_original_commands_work_as_its_readme_says(capsys, monkeypatch, tmp_path):
    """bytedance/SALMONN's README runs these three; without the weights each names what to download."""
    import train
    import web_demo

    monkeypatch.chdir(REPO)
    commands = [lambda: train.cli(["--cfg-path", "configs/config.yaml", "--options", f"run.output_dir={tmp_path}"]),
                lambda: cli_inference.main(["--cfg-path", "configs/decode_config.yaml"]),
                lambda: web_demo.main(["--cfg-path", "configs/decode_config.yaml"])]
    for command in commands:
        rc, err = command(), capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "Download" in err and "Traceback" not in err, err


def test_a_generate_only_config_asks_for_a_model_config(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    (tmp_path / "generate.yaml").write_text("generate:\n  num_beams: 1\n")
    assert cli_inference.main(["--cfg-path", str(tmp_path / "generate.yaml")]) == 2
    assert "no `model:` section" in capsys.readouterr().err


def test_flags_override_the_generate_section():
    cfg = load_inference_config([str(REPO / "configs/demo.yaml"), str(REPO / "configs/decode_config.yaml")],
                                ["generate.max_new_tokens=50"])
    args = argparse.Namespace(max_new_tokens=None, num_beams=1, temperature=None, top_p=None,
                              repetition_penalty=1.3, length_penalty=None, min_length=None, do_sample=None)
    settings = generation_settings(cfg.generate, args)
    assert settings["max_new_tokens"] == 50 and settings["num_beams"] == 1
    assert settings["repetition_penalty"] == 1.3
    assert "temperature" not in settings and "top_p" not in settings  # greedy: sampling knobs dropped
    args.do_sample, args.temperature = True, 0.7
    settings = generation_settings(cfg.generate, args)
    assert settings["do_sample"] is True and settings["temperature"] == 0.7 and settings["top_p"] == 0.9


def test_lora_scaling_reaches_the_lora_layers(session):
    def scalings():
        return {s for m in session.model.llama_model.modules() if isinstance(getattr(m, "scaling", None), dict)
                for s in m.scaling.values()}
    default = scalings()
    session.model.set_lora_scaling(0.25)
    assert scalings() == {0.25}
    session.model.set_lora_scaling(default.pop())


def test_a_prompt_longer_than_the_llms_context_is_refused_before_anything_runs(session, monkeypatch):
    """A 50,000-word prompt would hold the one-at-a-time queue for a minute and then fail in the LLM."""
    monkeypatch.setattr(session.model, "generate", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens, more than the LLM's context of 2048"):
        list(session.answer(demo_wavs(1), "word " * 50_000))
