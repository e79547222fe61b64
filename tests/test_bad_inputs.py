"""Bad inputs, tried as a careful user and as an attacker would (issue 22, cases 1, 2, 4, 5 and 8-11): nothing built
from data escapes its output folder, a reply is never read as an option, nothing typed is dropped, a conversion
never half replaces another, and every mistake is one line naming the file, line or key."""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import cli_inference
import convert
import evaluate
from humdial import judge
import train
import web_demo
from benchmarks import bench_train
from config import SCHEMA, ConfigError, load_config
from dataset_v1 import AudioError, audio_seconds, load_audio
from scripts import export_adapter
from humdial.submission import PackageError, speak, validate_package, write_package

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs/demo.yaml")
# A TTS stand-in: a short tone to {out}, and its arguments (after the interpreter's) to <out>.argv.json.
ECHO_TTS = (f"{shlex.quote(sys.executable)} -c \"import sys, json, numpy, soundfile; "
            "soundfile.write(sys.argv[1], numpy.full(800, 0.1), 8000); "
            "json.dump(sys.argv[1:], open(sys.argv[1] + '.argv.json', 'w'))\" {out} -- {text}")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def tone(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * 16000)) / 16000)), 16000)
    return path


def release_line(folder: Path, dialogue_id: str, n: int, **fields) -> dict:
    """A Task 3 test-release dialogue (happy, sad, neutral: turn 2 is answered) with its audio under folder/en/."""
    turns = [{"turn_id": k, "text": f"words {k}", "emotion": emotion, "response_text": "r" if k == 1 else "",
              "split_audio_file": f"audio/{tone(folder / 'en' / 'audio' / f'{n}_{k}.wav').name}"}
             for k, emotion in enumerate(("happy", "sad", "neutral"), start=1)]
    return {"dialogue_id": dialogue_id, "turns": turns, **fields}


def write_release(folder: Path, records: list[dict]) -> Path:
    path = folder / "en" / "HD-Track1-T3.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def converted(tmp_path: Path, records: list[dict]) -> tuple[Path, Path]:
    """(release file, annotation) of a blind release converted by convert.py."""
    release = write_release(tmp_path / "release", records)
    assert convert.main([str(release), "-o", str(tmp_path / "ann"), "--blind", "--name", "test"]) == 0
    return release, tmp_path / "ann" / "test.json"


def predictions_file(ann: Path, path: Path, reply: str = "I hear you.") -> Path:
    entries = json.loads(ann.read_text())["annotation"]
    path.write_text("".join(json.dumps({"id": e["id"], "task": e["task"], "language": e["language"],
                                        "prediction": reply}) + "\n" for e in entries), encoding="utf-8")
    return path


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------- 1. traversal
@pytest.mark.parametrize("field, record", [
    ("dialogue_id", {"dialogue_id": "../../../../outside/x"}),
    ("language", {"language": "../../outside"}),
    ("turn_id", {"turn_id": "../../../x"}),
])
def test_convert_refuses_ids_and_languages_that_are_not_plain_file_names(tmp_path, capsys, field, record):
    bad = release_line(tmp_path / "release", "task3_3_en_0002", 2)
    if field == "turn_id":
        bad["turns"][1]["turn_id"] = record["turn_id"]
    else:
        bad.update(record)
    release = write_release(tmp_path / "release", [release_line(tmp_path / "release", "task3_3_en_0001", 1), bad])
    assert convert.main([str(release), "-o", str(tmp_path / "ann"), "--blind", "--name", "test"]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert any(f"{release}:2" in e and field in e and "not a plain file name" in e for e in errors), errors
    assert not (tmp_path / "ann").exists()


def test_convert_refuses_a_name_that_leaves_the_output_folder(tmp_path, capsys):
    release = write_release(tmp_path / "release", [release_line(tmp_path / "release", "task3_3_en_0001", 1)])
    before = files_under(tmp_path)
    assert convert.main([str(release), "-o", str(tmp_path / "a" / "ann"), "--blind", "--name", "../../x"]) == 1
    assert "--name" in error_lines(capsys.readouterr().err)[0]
    assert files_under(tmp_path) == before


def test_a_package_never_writes_outside_itself(tmp_path):
    release, ann = converted(tmp_path, [release_line(tmp_path / "release", "task3_3_en_0001", 1)])
    entries = json.loads(ann.read_text())["annotation"]
    entries[0]["id"] = entries[0]["release_record"]["dialogue_id"] = "../../../../outside/x"  # a hand-edited file
    records = [{"id": e["id"], "task": e["task"], "prediction": "I hear you."} for e in entries]
    before = files_under(tmp_path)
    with pytest.raises(PackageError, match="dialogue_id '../../../../outside/x' is not a plain file name"):
        write_package(records, entries, tmp_path / "deep" / "a" / "b" / "pkg", {"en": ECHO_TTS})
    assert files_under(tmp_path) == before


def test_the_validator_refuses_a_test_set_whose_ids_leave_the_package(tmp_path):
    release, ann = converted(tmp_path, [release_line(tmp_path / "release", "task3_3_en_0001", 1)])
    write_package([{"id": "task3_3_en_0001", "task": "empathy", "prediction": "I hear you."}],
                  json.loads(ann.read_text())["annotation"], tmp_path / "pkg", {"en": ECHO_TTS})
    assert validate_package(tmp_path / "pkg", [release]) == []
    tampered = json.loads(release.read_text())
    tampered["dialogue_id"] = "../../../../outside/x"
    release.write_text(json.dumps(tampered) + "\n")
    problems = validate_package(tmp_path / "pkg", [release])
    assert any("not a plain file name" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- 2. TTS options
def test_the_default_tts_commands_pass_the_reply_after_end_of_options(tmp_path):
    # espeak-ng's place taken by a stand-in that writes the wav after -w and records the arguments it was given
    stand_in = (f"{shlex.quote(sys.executable)} -c \"import sys, json, numpy, soundfile; "
                "soundfile.write(sys.argv[sys.argv.index('-w') + 1], numpy.full(800, 0.1), 8000); "
                f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\"")
    for command in SCHEMA["submission"]["tts_command"].values():
        speak("-f/etc/passwd", tmp_path / "reply.wav", command.replace("espeak-ng", stand_in, 1))
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[-2:] == ["--", "-f/etc/passwd"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the default TTS command needs espeak-ng")
def test_a_reply_starting_with_a_dash_is_spoken_as_text(tmp_path):
    command = SCHEMA["submission"]["tts_command"]["en"]

    def seconds(text: str, name: str) -> float:
        speak(text, tmp_path / name, command)
        return sf.info(str(tmp_path / name)).duration

    assert seconds("-f/etc/passwd", "a.wav") < 3 * seconds("f etc passwd", "b.wav")  # not the file read aloud
    assert seconds("- I understand how you feel.", "c.wav") > 0.5 * seconds("I understand how you feel.", "d.wav")


def test_a_tts_template_without_end_of_options_is_refused_before_anything_runs(tmp_path, capsys):
    release, ann = converted(tmp_path, [release_line(tmp_path / "release", "task3_3_en_0001", 1)])
    predictions = predictions_file(ann, tmp_path / "predictions.jsonl")
    rc = evaluate.main(["--from-predictions", str(predictions), "--ann", str(ann), "--submission-dir",
                        str(tmp_path / "pkg"), "--options", "submission.tts_command.en=espeak-ng -w {out} {text}"])
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and "submission.tts_command.en" in errors[0] and "`--`" in errors[0]
    assert not (tmp_path / "pkg").exists()


def test_from_predictions_builds_and_checks_the_package_without_decoding(tmp_path, capsys, monkeypatch):
    release, ann = converted(tmp_path, [release_line(tmp_path / "release", "task3_3_en_0001", 1),
                                        release_line(tmp_path / "release", "task3_3_en_0002", 2)])
    predictions = predictions_file(ann, tmp_path / "predictions.jsonl", reply="-f/etc/passwd")
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("--from-predictions loaded a model"))
    for clip in tmp_path.rglob("*.wav"):  # packaging reads no audio: the clips need not be here
        clip.unlink()
    rc = evaluate.main(["--from-predictions", str(predictions), "--ann", str(ann), "--submission-dir",
                        str(tmp_path / "pkg"), "--options", f"submission.tts_command.en={ECHO_TTS}"])
    assert rc == 0 and capsys.readouterr().out.strip().endswith("valid package")
    assert validate_package(tmp_path / "pkg", [release]) == []
    answered = [json.loads(line) for line in (tmp_path / "pkg/en/HD-Track1-T3.jsonl").read_text().splitlines()]
    assert [r["turns"][1]["response_text"] for r in answered] == ["-f/etc/passwd"] * 2
    # predictions of another annotation are refused, not packaged beside it
    (tmp_path / "other.jsonl").write_text(predictions.read_text() + json.dumps(
        {"id": "task9", "task": "empathy", "language": "en", "prediction": "x"}) + "\n")
    assert evaluate.main(["--from-predictions", str(tmp_path / "other.jsonl"), "--ann", str(ann),
                          "--submission-dir", str(tmp_path / "pkg2"), "--options",
                          f"submission.tts_command.en={ECHO_TTS}"]) == 2
    assert "answer no dialogue of the annotation, e.g. task9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 4. repeats
@pytest.mark.parametrize("parse, extra", [(train.parse_args, []), (evaluate.parse_args, []),
                                          (cli_inference.parse_args, []), (web_demo.parse_args, []),
                                          (export_adapter.parse_args, ["--out", "x"]),
                                          (bench_train.parse_args, [])])
def test_options_and_cfg_path_repeat_and_merge_in_order(tmp_path, parse, extra):
    second = tmp_path / "second.yaml"
    second.write_text("run:\n  batch_size_eval: 3\n  seed: 5\n")
    args = parse(["--cfg-path", DEMO_CFG, "--options", "model.ckpt=mine.pth", "run.seed=1",
                  "--cfg-path", str(second), "--options", "run.batch_size_eval=2", *extra])
    assert args.cfg_path == [DEMO_CFG, str(second)]
    cfg = load_config(args.cfg_path, args.options)
    assert (cfg.model.ckpt, cfg.run.seed, cfg.run.batch_size_eval) == ("mine.pth", 1, 2)


# ---------------------------------------------------------------------------------------------- 5. conversions
def test_a_folder_holding_another_conversion_is_refused_unless_replaced_whole(tmp_path, capsys):
    records = [release_line(tmp_path / "release", f"task3_3_en_000{n}", n) for n in range(1, 5)]
    release = write_release(tmp_path / "release", records)
    out = tmp_path / "ann"
    assert convert.main([str(release), "-o", str(out), "--valid-ratio", "0.5"]) == 0
    before = {name: (out / name).read_bytes() for name in ("train.json", "valid.json", "train_report.json")}
    assert convert.main([str(release), "-o", str(out)]) == 1  # no valid split: would keep the old valid.json
    error = error_lines(capsys.readouterr().err)[0]
    assert "earlier conversion" in error and "valid.json" in error and "--replace" in error
    assert {name: (out / name).read_bytes() for name in before} == before
    assert convert.main([str(release), "-o", str(out), "--replace"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "train_report.json"]
    assert len(json.loads((out / "train.json").read_text())["annotation"]) == 4
    # another name beside it is another conversion, kept
    assert convert.main([str(release), "-o", str(out), "--name", "test", "--blind"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "test_report.json", "train.json",
                                                      "train_report.json"]


# ---------------------------------------------------------------------------------------------- 8. ranges
@pytest.mark.parametrize("option, key", [
    ("run.grad_clip=-1", "run.grad_clip"), ("run.optims.max_epoch=0", "run.optims.max_epoch"),
    ("run.iters_per_epoch=0", "run.iters_per_epoch"), ("run.output_dir=''", "run.output_dir"),
    ("run.optims.init_lr=0", "run.optims.init_lr"), ("run.batch_size_train=0", "run.batch_size_train"),
    ("run.batch_size_eval=null", "run.batch_size_eval"), ("run.keep_last=0", "run.keep_last"),
    ("run.num_workers=-1", "run.num_workers"), ("generate.num_beams=0", "generate.num_beams"),
])
def test_values_that_make_no_sense_fail_at_load_naming_the_key(tmp_path, capsys, option, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config(DEMO_CFG, [option])
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", f"run.output_dir={tmp_path / 'run'}", option]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and key in errors[0]
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_a_gpu_that_is_not_there_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(train, "build_model", lambda cfg: pytest.fail("the model was built"))
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", f"run.output_dir={tmp_path}", "run.device=cuda"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "no CUDA device" in errors[0]


# ---------------------------------------------------------------------------------------------- 9. audio
def truncated_and_nan_wavs(folder: Path) -> tuple[Path, Path]:
    whole = tone(folder / "whole.wav", 2.0)
    truncated = folder / "truncated.wav"
    truncated.write_bytes(whole.read_bytes()[:200])  # 200 of 64,044 bytes, as a broken copy leaves it
    nan = folder / "nan.wav"
    sf.write(str(nan), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    return truncated, nan


def test_truncated_and_nan_audio_are_refused_by_convert_naming_the_line(tmp_path, capsys):
    truncated, nan = truncated_and_nan_wavs(tmp_path / "release" / "en" / "audio")
    lines = [release_line(tmp_path / "release", f"task3_3_en_000{n}", n) for n in (1, 2, 3)]
    lines[1]["turns"][0]["split_audio_file"] = "audio/truncated.wav"
    lines[2]["turns"][2]["split_audio_file"] = "audio/nan.wav"
    release = write_release(tmp_path / "release", lines)
    assert convert.main([str(release), "-o", str(tmp_path / "ann"), "--blind"]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert any(f"{release}:2" in e and "turn 1" in e and "truncated" in e for e in errors), errors
    assert any(f"{release}:3" in e and "turn 3" in e and "non-finite" in e for e in errors), errors


def test_truncated_and_nan_audio_are_refused_before_training_and_decoding(tmp_path):
    truncated, nan = truncated_and_nan_wavs(tmp_path)
    with pytest.raises(AudioError, match="truncated.wav"):
        audio_seconds(truncated)  # the check before a model loads (train.py, evaluate.py, the CLI, the web demo)
    with pytest.raises(AudioError, match="non-finite samples.*nan.wav"):
        load_audio(nan)  # every clip a batch reads


def test_a_truncated_clip_stops_training_before_the_model_loads(tmp_path, capsys, monkeypatch):
    truncated, _ = truncated_and_nan_wavs(tmp_path)
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"annotation": [{"id": "u1", "path": "truncated.wav", "text": "hi", "task": "asr"}]}))
    monkeypatch.setattr(train, "build_model", lambda cfg: pytest.fail("the model was built"))
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", f"datasets.train_ann_path={ann}",
                      "datasets.valid_ann_path=''", f"run.output_dir={tmp_path / 'run'}"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "truncated.wav" in errors[0] and "truncated" in errors[0]


def test_non_utf8_input_names_file_and_line_and_is_skipped_when_asked(tmp_path, capsys):
    good = [json.dumps(release_line(tmp_path / "release", f"task3_3_en_000{n}", n)).encode() for n in (1, 2)]
    release = tmp_path / "release" / "en" / "HD-Track1-T3.jsonl"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_bytes(good[0] + b"\n" + "{\"dialogue_id\": \"café\"}".encode("latin-1") + b"\n" + good[1] + b"\n")
    assert convert.main([str(release), "-o", str(tmp_path / "ann"), "--blind"]) == 1
    assert any(f"{release}:2: not UTF-8" in e for e in error_lines(capsys.readouterr().err))
    assert convert.main([str(release), "-o", str(tmp_path / "ann"), "--blind", "--skip-invalid"]) == 0
    report = json.loads((tmp_path / "ann" / "train_report.json").read_text())
    assert report["skipped"] == {"not_utf8": 1} and report["entries"] == {"train": 2}


# ---------------------------------------------------------------------------------------------- 10. the judge
ANSWER = {"id": "d1", "task": "empathy", "language": "en", "prediction": "That must hurt."}
ENTRY = {"id": "d1", "task": "empathy", "language": "en", "Q": "q", "text": "ref",
         "turns": [{"path": "a.wav", "transcript": "I failed.", "emotion": "sad", "duration": 1.0, "reply": "Oh."},
                   {"path": "b.wav", "transcript": "I am not good enough.", "emotion": "sad", "duration": 1.0}]}


@pytest.fixture
def endpoint():
    """A local endpoint that answers every POST with the body and content type in `reply` (changeable)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    reply = {"body": b"", "type": "application/json", "asked": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            reply["asked"] += 1
            self.send_response(200)
            self.send_header("Content-Type", reply["type"])
            self.send_header("Content-Length", str(len(reply["body"])))
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reply["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield reply
    server.shutdown()
    server.server_close()


def chat(content: str) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}).encode()


def judge_once(endpoint: dict, tmp_path: Path) -> dict:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": [ENTRY]}))
    for name in ("a.wav", "b.wav"):
        tone(tmp_path / name)
    cfg = {"base_url": endpoint["url"], "model": "m", "max_retries": 0, "cache_path": str(tmp_path / "cache.jsonl"),
           "prompt_path": str(ROOT / "prompts/judge_prompts.json")}
    return judge.judge_records([ANSWER], ann, cfg, tmp_path, show_progress=False)


@pytest.mark.parametrize("body, content_type", [(b"<html><body>502 Bad Gateway</body></html>", "text/html"),
                                                (bytes(range(256)), "application/octet-stream"),
                                                (b"<html>oops</html>", "application/json")])
def test_a_body_that_is_not_a_chat_completion_names_the_endpoint(endpoint, tmp_path, body, content_type):
    endpoint.update(body=body, type=content_type)
    with pytest.raises(judge.JudgeError, match=f"judge {endpoint['url']} sent"):
        judge_once(endpoint, tmp_path)


def test_an_unparsable_judgment_is_recorded_but_asked_again(endpoint, tmp_path):
    endpoint.update(body=chat("I cannot grade this."))
    first = judge_once(endpoint, tmp_path)
    assert first["judgments"][0]["unparsable"] == ["textual_empathy_insight"] and endpoint["asked"] == 1
    assert "I cannot grade this." in (tmp_path / "cache.jsonl").read_text()  # recorded
    endpoint.update(body=chat('{"textual_empathy_insight": 4}'))  # the endpoint fixed
    second = judge_once(endpoint, tmp_path)
    assert endpoint["asked"] == 2 and second["cache"] == {**second["cache"], "reused": 0, "asked": 1}
    assert second["scores"]["empathy/en"] == {"textual_empathy_insight": 4}
    judge_once(endpoint, tmp_path)
    assert endpoint["asked"] == 2  # a final judgment is reused


# ---------------------------------------------------------------------------------------------- 11. the rest
@pytest.mark.parametrize("text, where", [
    ("run:\n  seed: 1\n  seed: 2\n", ":3:3: not valid YAML: found duplicate key seed"),
    ("run:\n  seed: [1\n", ":3:1: not valid YAML"),
    ("run:\n\tseed: 1\n", ":2:1: not valid YAML"),
])
def test_yaml_mistakes_name_file_and_line(tmp_path, capsys, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert train.cli(["--cfg-path", DEMO_CFG, "--cfg-path", str(bad)]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"{bad}{where}" in errors[0]


def test_a_bad_interpolation_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  output_dir: ${run.nope}/x\n")
    with pytest.raises(ConfigError, match="`run.output_dir`.*run.nope"):
        load_config([DEMO_CFG, str(bad)])


def test_a_port_in_use_is_one_line_naming_port_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(web_demo, "open_assistant", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert web_demo.main(["--port", str(port)]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--port" in errors[0] and str(port) in errors[0]


def test_a_negative_limit_and_an_empty_annotation_decode_nothing_and_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert evaluate.main(["--limit", "-3", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--limit" in error_lines(capsys.readouterr().err)[0]
    empty = tmp_path / "empty.json"
    empty.write_text('{"annotation": []}')
    assert evaluate.main(["--ann", str(empty), "--out-dir", str(tmp_path / "b")]) == 2
    assert f"{empty}: no entries" in error_lines(capsys.readouterr().err)[0]
