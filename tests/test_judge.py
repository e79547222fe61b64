"""The LLM judge (judge.py, evaluate.py --judge): prompts, sampling settings, score parsing and mapping, retries,
the resumable cache and the command line, against a scripted chat-completions server on 127.0.0.1."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

import evaluate
from humdial import judge
from humdial.tasks import TASKS
from dataset_v1 import read_annotation

REPO = Path(__file__).resolve().parents[1]
DEMO_ANN = REPO / "data/demo/ann/test.json"
PROMPTS = REPO / "prompts/judge_prompts.json"
T1_CLEAN = '{"reason": "fine", "Accuracy_Completeness": 5, "Depth_Granularity": 3, "Added_Value": 1}'


# ---------------------------------------------------------------------------------------------- the test server
@dataclass
class Reply:
    content: str = T1_CLEAN
    status: int = 200
    delay: float = 0.0
    wait: threading.Event | None = None  # hold the reply until the test sets this


@dataclass
class ChatServer:
    """POST /v1/chat/completions with scripted replies: script(n, body) -> Reply for the n-th request (1-based).
    Every request's headers and JSON body are recorded."""
    script: Callable[[int, dict], Reply]
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "ChatServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    owner.requests.append({"path": self.path, "headers": headers, "body": body})
                    n = len(owner.requests)
                reply = owner.script(n, body) if self.path == "/v1/chat/completions" else Reply("", 404)
                if reply.wait is not None:
                    reply.wait.wait(timeout=60)
                time.sleep(reply.delay)
                if reply.status == 200:
                    payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                               "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop", "message":
                                                                    {"role": "assistant", "content": reply.content}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                else:
                    payload = {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    return

            def log_message(self, *args):
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def asked_answers(self) -> list[str]:
        """The ANSWER-<n> marker of each request's answer under evaluation."""
        return [re.search(r"ANSWER-\d+", r["body"]["messages"][1]["content"]).group() for r in self.requests]


@pytest.fixture
def serve():
    servers = []

    def start(script: Callable[[int, dict], Reply]) -> ChatServer:
        servers.append(ChatServer(script).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def always(reply: Reply) -> Callable[[int, dict], Reply]:
    return lambda n, body: reply


def judge_cfg(server: ChatServer, tmp_path: Path, **overrides) -> dict:
    return {"base_url": server.url, "model": "judge-under-test", "prompt_path": str(PROMPTS), "timeout": 5.0,
            "max_retries": 2, "concurrency": 2, "cache_path": str(tmp_path / "cache.jsonl"), **overrides}


# ---------------------------------------------------------------------------------------------- test data
DIALOGUES = [  # id, task, language, [(transcript, emotion, reply)], final (transcript, emotion)
    ("d1", "emotional_trajectory", "en",
     [("The bakery sold out of my favourite bread.", "sad", "That is a pity."),
      ("Then a friend brought me a loaf from home.", "happy", "How kind of them!")],
     ("Can you go over how my mood moved during this chat?", "neutral")),
    ("d2", "emotional_trajectory", "en",
     [("My bike chain snapped on the hill.", "anger", "That sounds frustrating.")],
     ("What emotions did I go through?", "neutral")),
    ("d3", "emotional_trajectory", "en",
     [("A stray dog followed me home.", "surprise", "Oh, really?")],
     ("Sum up my feelings so far, please.", "neutral")),
    ("d4", "emotional_trajectory", "en",
     [("The lights went out during the storm.", "fear", "Are you safe now?")],
     ("How did I feel over this talk?", "neutral")),
    ("d5", "emotional_reasoning", "zh",
     [("我的论文被导师退回来了。", "sad", "听起来你很失落。")],
     ("你觉得我为什么这么难受？", "sad")),
    ("d6", "empathy", "en",
     [("I practised for weeks and still missed the audition.", "sad", "That must hurt.")],
     ("I keep thinking I am just not good enough.", "sad")),
]


def write_corpus(tmp_path: Path, dialogues=DIALOGUES, blind_turn: int | None = None) -> tuple[Path, Path]:
    """An annotation file whose audio is not on disk (judging reads transcripts and labels only) and a
    predictions.jsonl whose answer n carries the marker ANSWER-n."""
    entries, records = [], []
    for n, (did, task, language, history, final) in enumerate(dialogues, start=1):
        turns = []
        for k, (text, emotion, reply) in enumerate([*history, (*final, None)], start=1):
            turn = {"path": f"audio/{did}_{k}.wav", "transcript": text, "emotion": emotion, "duration": 1.0}
            if reply is not None:
                turn["reply"] = reply
            turns.append(turn)
        if blind_turn is not None:
            turns[blind_turn]["emotion"] = ""
        entries.append({"id": did, "task": task, "language": language, "Q": final[0], "text": "ref", "turns": turns})
        records.append({"id": did, "task": task, "language": language, "prompt": "p", "reference": "ref",
                        "prediction": f"My answer ANSWER-{n} about this.", "emotions": []})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": entries}, ensure_ascii=False), encoding="utf-8")
    predictions = tmp_path / "run" / "predictions.jsonl"
    predictions.parent.mkdir(exist_ok=True)
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return ann, predictions


def t1_only(tmp_path: Path, count: int) -> tuple[Path, Path]:
    base = DIALOGUES[0]
    return write_corpus(tmp_path, [(f"t{i}", *base[1:]) for i in range(count)])


# ---------------------------------------------------------------------------------------------- prompts and requests
def test_prompt_carries_history_with_gold_tags_and_the_sampling_settings(serve, tmp_path, monkeypatch):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    server = serve(always(Reply()))
    monkeypatch.setenv("JUDGE_TEST_KEY", "secret-123")
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path, api_key_env="JUDGE_TEST_KEY",
                                                        max_tokens=321), show_progress=False)
    (request,) = server.requests
    body = request["body"]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer secret-123"
    assert (body["model"], body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == \
        ("judge-under-test", 0.6, 0.95, 20, 321)
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    prompt = user["content"]
    expected_in_order = ["User [sad]: The bakery sold out of my favourite bread.", "Assistant: That is a pity.",
                         "User [happy]: Then a friend brought me a loaf from home.", "Assistant: How kind of them!",
                         "User [neutral]: Can you go over how my mood moved during this chat?",
                         "My answer ANSWER-1 about this."]
    positions = [prompt.index(text) for text in expected_in_order]
    assert positions == sorted(positions)
    assert all(d in prompt for d in TASKS["emotional_trajectory"].judge_dimensions)


def test_placeholders_in_the_dialogue_or_answer_are_left_alone():
    prompts = judge.load_prompts(PROMPTS)
    entry = {"turns": [{"transcript": "I typed {answer} by mistake.", "emotion": "surprise", "reply": "Ha."},
                       {"transcript": "Tell me about {dialogue}?", "emotion": "neutral"}]}
    record = {"task": "emotional_trajectory", "prediction": "See {final_turn}."}
    _, user = judge.build_messages(record, entry, prompts)
    text = user["content"]
    assert "User [surprise]: I typed {answer} by mistake." in text
    assert "User [neutral]: Tell me about {dialogue}?" in text and "See {final_turn}." in text
    assert text.count("See {final_turn}.") == 1


def test_no_more_requests_in_flight_than_the_concurrency(serve, tmp_path):
    ann, predictions = t1_only(tmp_path, 6)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def script(n, body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return Reply()

    server = serve(script)
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path, concurrency=2), show_progress=False)
    assert len(server.requests) == 6 and peak[0] == 2


def test_default_api_key_and_each_task_gets_its_rubric(serve, tmp_path):
    ann, predictions = write_corpus(tmp_path, [DIALOGUES[4], DIALOGUES[5]])
    server = serve(always(Reply()))
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    assert {r["headers"]["authorization"] for r in server.requests} == {"Bearer EMPTY"}
    prompts = dict(zip(server.asked_answers(), [r["body"]["messages"][1]["content"] for r in server.requests]))
    assert "Insight_RootCause" in prompts["ANSWER-1"]
    assert "User [sad]: 你觉得我为什么这么难受？" in prompts["ANSWER-1"]
    assert "textual_empathy_insight" in prompts["ANSWER-2"] and "Accuracy_Completeness" not in prompts["ANSWER-2"]


def test_prompt_file_missing_a_placeholder_is_named(tmp_path):
    raw = json.loads(PROMPTS.read_text(encoding="utf-8"))
    raw["empathy"] = [line.replace("{answer}", "") for line in raw["empathy"]]
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(judge.JudgeError, match=r"`empathy` template lacks \{answer\}"):
        judge.load_prompts(bad)


# ---------------------------------------------------------------------------------------------- parsing and mapping
@pytest.mark.parametrize("reply, expected", [
    (T1_CLEAN, (5, 3, 1)),
    ('Here is my verdict:\n```json\n{"Accuracy_Completeness": 4, "Depth_Granularity": 2, "Added_Value": 5}\n```\n'
     "Hope this helps.", (3, 1, 5)),  # ties go down: 4 -> 3, 2 -> 1
    ("The answer is thorough. {\"scores\": {\"accuracy completeness\": \"5\", \"Depth_Granularity\": \"3 - ok\", "
     "\"Added_Value\": {\"score\": 3}}} That is all.", (5, 3, 3)),
    ("**Accuracy Completeness**: 5\nDepth_Granularity = 2.9\nAdded-Value: [0]", (5, 3, 1)),
    ('{"Accuracy_Completeness": 9, "Depth_Granularity": -2, "Added_Value": 3.9}', (5, 1, 3)),
    ('{"Accuracy_Completeness": 1, "Depth_Granularity": 1, "Added_Value": 1} on reflection '
     '{"Accuracy_Completeness": 5, "Depth_Granularity": 5, "Added_Value": 5}', (5, 5, 5)),  # the last object wins
    ("<think>Accuracy_Completeness: 1</think>Accuracy_Completeness: 5", (5, None, None)),
    ("I am unable to grade this answer.", (None, None, None)),
    ('{"Accuracy_Completeness": "excellent", "Depth_Granularity": true, "Added_Value": null}', (None, None, None)),
    ("", (None, None, None)),
])
def test_parse_scores_maps_onto_one_three_five(reply, expected):
    dims = TASKS["emotional_trajectory"].judge_dimensions
    assert judge.parse_scores(reply, "emotional_trajectory") == dict(zip(dims, expected))


@pytest.mark.parametrize("value, expected", [(4.6, 5), (4.5, 4), (0, 1), (12, 5), (2, 2), (3.2, 3)])
def test_empathy_text_score_is_one_to_five_clipped(value, expected):
    reply = json.dumps({"textual_empathy_insight": value})
    assert judge.parse_scores(reply, "empathy") == {"textual_empathy_insight": expected}


def test_unparsable_replies_score_the_minimum_and_are_counted(serve, tmp_path):
    replies = {  # answer marker -> judge reply
        "ANSWER-1": T1_CLEAN,  # 5 3 1
        "ANSWER-2": 'Verdict:\n```json\n{"Accuracy_Completeness": 4, "Depth_Granularity": 5, "Added_Value": 5}\n```',
        "ANSWER-3": "Accuracy_Completeness: 5\nDepth_Granularity: 3\n(no third score)",  # Added_Value unreadable
        "ANSWER-4": "Sorry, I cannot do that.",  # nothing readable
        "ANSWER-5": '{"scores": {"Information_Integration": "5", "Insight_RootCause": 3, "Clarity_Logic": 2}}',
        "ANSWER-6": "textual_empathy_insight: 4",
    }
    ann, predictions = write_corpus(tmp_path)
    server = serve(lambda n, body: Reply(replies[re.search(r"ANSWER-\d", body["messages"][1]["content"]).group()]))
    summary = judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    assert len(server.requests) == 6 and summary["num_judged"] == 6
    assert summary["counts"] == {"emotional_reasoning/zh": 1, "emotional_trajectory/en": 4, "empathy/en": 1}
    t1 = summary["scores"]["emotional_trajectory/en"]
    assert t1 == {"Accuracy_Completeness": (5 + 3 + 5 + 1) / 4, "Depth_Granularity": (3 + 5 + 3 + 1) / 4,
                  "Added_Value": (1 + 5 + 1 + 1) / 4}
    assert summary["unparsable"]["emotional_trajectory/en"] == {"Accuracy_Completeness": 1, "Depth_Granularity": 1,
                                                               "Added_Value": 2}
    assert summary["scores"]["emotional_reasoning/zh"] == {"Information_Integration": 5, "Insight_RootCause": 3,
                                                           "Clarity_Logic": 1}
    assert summary["scores"]["empathy/en"] == {"textual_empathy_insight": 4}
    by_id = {j["id"]: j for j in summary["judgments"]}
    assert by_id["d4"]["unparsable"] == list(TASKS["emotional_trajectory"].judge_dimensions)
    # partial challenge score: en has T1 (0.2) and T3 text (0.1); zh has T2 (0.2); vocal/naturalness human-rated
    en = summary["challenge"]["en"]
    assert en["weight_covered"] == pytest.approx(0.3)
    assert en["weighted_sum"] == pytest.approx(0.2 * sum(t1.values()) / 3 + 0.1 * 4)
    statuses = {p["part"]: p["status"] for p in en["parts"]}
    assert statuses == {"emotional_trajectory": "judged", "emotional_reasoning": "no predictions", "empathy": "judged",
                        "empathy/vocal_empathy_congruence": "human-rated",
                        "empathy/audio_quality_naturalness": "human-rated"}
    assert summary["challenge"]["mean"]["weighted_sum"] is None  # zh and en cover different parts
    written = json.loads((predictions.parent / "judge_scores.json").read_text(encoding="utf-8"))
    assert written["scores"] == summary["scores"] and written["judge"]["model"] == "judge-under-test"
    table = judge.format_judge_table(summary)
    assert "Added_Value" in table and "not measured" in table and "weight 0.3" in table


def test_challenge_mean_over_both_languages():
    scores = {"emotional_trajectory/en": {"a": 5.0, "b": 3.0, "c": 1.0},
              "emotional_trajectory/zh": {"a": 5.0, "b": 5.0, "c": 5.0}}
    challenge = judge.challenge_scores(scores)
    assert challenge["en"]["weighted_sum"] == pytest.approx(0.2 * 3) and challenge["zh"]["weighted_sum"] == 1.0
    assert challenge["mean"] == {"weighted_sum": pytest.approx((0.6 + 1.0) / 2), "weight_covered": 0.2}


# ---------------------------------------------------------------------------------------------- retries
def test_server_errors_are_retried_until_success(serve, tmp_path):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    server = serve(lambda n, body: Reply(status=500) if n == 1 else Reply(status=503) if n == 2 else Reply())
    summary = judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path, max_retries=3),
                                      show_progress=False)
    assert len(server.requests) == 3
    assert summary["judgments"][0]["scores"] == {"Accuracy_Completeness": 5, "Depth_Granularity": 3,
                                                 "Added_Value": 1}


def test_a_slow_reply_times_out_and_is_retried(serve, tmp_path):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    server = serve(lambda n, body: Reply(delay=2.0) if n == 1 else Reply())
    started = time.monotonic()
    summary = judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path, timeout=0.3),
                                      show_progress=False)
    assert len(server.requests) == 2 and time.monotonic() - started < 2.0  # did not wait for the slow reply
    assert summary["unparsable"]["emotional_trajectory/en"]["Accuracy_Completeness"] == 0


def test_a_client_error_is_not_retried(serve, tmp_path):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    server = serve(always(Reply(status=400)))
    with pytest.raises(judge.JudgeError, match="HTTP 400"):
        judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    assert len(server.requests) == 1


def test_spent_retries_fail_but_keep_what_was_judged(serve, tmp_path):
    ann, predictions = t1_only(tmp_path, 3)
    server = serve(lambda n, body: Reply() if n == 1 else Reply(status=500))
    cfg = judge_cfg(server, tmp_path, max_retries=1, concurrency=1)
    with pytest.raises(judge.JudgeError, match=r"HTTP 500 .*after up to 1 retries"):
        judge.judge_predictions(predictions, ann, cfg, show_progress=False)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 1
    assert not (predictions.parent / "judge_scores.json").exists()


def test_an_unreachable_judge_is_named(tmp_path):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "prompt_path": str(PROMPTS), "max_retries": 0,
           "cache_path": str(tmp_path / "cache.jsonl")}
    with pytest.raises(judge.JudgeError, match=f"127.0.0.1:{port}/v1 unreachable"):
        judge.judge_predictions(predictions, ann, cfg, show_progress=False)


# ---------------------------------------------------------------------------------------------- the cache
def test_killed_cli_run_resumes_from_its_cache(serve, tmp_path):
    """`python evaluate.py --judge` killed while the judge holds its 4th request; the rerun asks only for the
    answers that were not cached."""
    ann, predictions = t1_only(tmp_path, 6)
    release = threading.Event()
    server = serve(lambda n, body: Reply(wait=release) if n == 4 else Reply())
    cache = tmp_path / "cache.jsonl"
    options = [f"judge.cache_path={cache}", f"judge.prompt_path={PROMPTS}", "judge.concurrency=1",
               "judge.timeout=60"]
    process = subprocess.Popen(
        [sys.executable, "evaluate.py", "--judge", str(predictions), "--ann", str(ann), "--judge-url", server.url,
         "--judge-model", "judge-under-test", "--options", *options],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (len(server.requests) >= 4 and cache.is_file() and len(cache.read_text().splitlines()) >= 3):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the judging run did not get to its 4th request"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(cached) == 3 and not (predictions.parent / "judge_scores.json").exists()

    resumed = serve(always(Reply()))
    summary = judge.judge_predictions(predictions, ann, judge_cfg(resumed, tmp_path), show_progress=False)
    asked_first = server.asked_answers()[:3]
    assert sorted(resumed.asked_answers()) == sorted({f"ANSWER-{n}" for n in range(1, 7)} - set(asked_first))
    assert summary["num_judged"] == 6 and summary["cache"] == {"path": str(cache), "reused": 3, "asked": 3,
                                                              "dropped_cut_lines": 0}


def test_a_cut_last_cache_line_is_dropped_reported_and_asked_again(serve, tmp_path, capsys):
    ann, predictions = t1_only(tmp_path, 3)
    first = serve(always(Reply()))
    judge.judge_predictions(predictions, ann, judge_cfg(first, tmp_path), show_progress=False)
    cache = tmp_path / "cache.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed halfway through a write
    again = serve(always(Reply()))
    summary = judge.judge_predictions(predictions, ann, judge_cfg(again, tmp_path), show_progress=False)
    assert len(again.requests) == 1 and summary["cache"]["dropped_cut_lines"] == 1
    assert "cache.jsonl:3: last line cut short" in capsys.readouterr().err
    assert [json.loads(line)["key"] for line in cache.read_text().splitlines()] == [json.loads(x)["key"] for x in lines]


@pytest.mark.parametrize("bad_line", ["not json", '{"key": "b"}', '["key", "reply"]'])
def test_a_broken_line_inside_the_cache_is_an_error(tmp_path, bad_line):
    cache = tmp_path / "cache.jsonl"
    cache.write_text(f'{{"key": "a", "reply": "x"}}\n{bad_line}\n{{"key": "c", "reply": "y"}}\n')
    with pytest.raises(judge.JudgeError, match=r"cache.jsonl:2: not a judgment line"):
        judge.JudgmentCache(cache)


def test_another_judge_model_is_asked_again(serve, tmp_path):
    ann, predictions = t1_only(tmp_path, 2)
    server = serve(always(Reply()))
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    assert len(server.requests) == 2
    judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path, model="other-judge"), show_progress=False)
    assert len(server.requests) == 4


# ---------------------------------------------------------------------------------------------- bad input
def test_records_without_their_dialogue_or_gold_tags_are_errors(serve, tmp_path):
    server = serve(always(Reply()))
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:2])
    (tmp_path / "other").mkdir()
    other_ann, _ = write_corpus(tmp_path / "other", DIALOGUES[2:3])
    with pytest.raises(judge.JudgeError, match="no dialogue with id 'd1' and task 'emotional_trajectory'"):
        judge.judge_predictions(predictions, other_ann, judge_cfg(server, tmp_path), show_progress=False)
    (tmp_path / "blind").mkdir()
    blind_ann, _ = write_corpus(tmp_path / "blind", DIALOGUES[:2], blind_turn=0)
    with pytest.raises(judge.JudgeError, match=r"dialogue d1, turn 1: no 'emotion'"):
        judge.judge_predictions(predictions, blind_ann, judge_cfg(server, tmp_path), show_progress=False)
    assert server.requests == []


def test_records_of_unjudged_tasks_are_counted_not_dropped_silently(serve, tmp_path):
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    with open(predictions, "a") as f:
        f.write(json.dumps({"id": "clip9", "task": "asr", "language": "en", "prediction": "hello"}) + "\n")
    server = serve(always(Reply()))
    summary = judge.judge_predictions(predictions, ann, judge_cfg(server, tmp_path), show_progress=False)
    assert summary["skipped_tasks"] == {"asr": 1} and summary["num_judged"] == 1


# ---------------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_judge_on_demo_predictions(serve, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    entries = read_annotation(DEMO_ANN)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": e["id"], "task": e["task"], "language": e["language"],
                                               "prediction": f"ANSWER-{n} calm then upset"}, ensure_ascii=False)
                                   + "\n" for n, e in enumerate(entries)), encoding="utf-8")
    server = serve(always(Reply()))
    rc = evaluate.main(["--judge", str(predictions), "--ann", str(DEMO_ANN), "--judge-url", server.url,
                        "--judge-model", "judge-under-test"])
    out = capsys.readouterr().out
    assert rc == 0 and len(server.requests) == len(entries)
    assert {r["body"]["model"] for r in server.requests} == {"judge-under-test"}
    written = json.loads((tmp_path / "judge_scores.json").read_text(encoding="utf-8"))
    assert set(written["counts"]) == {f"{e['task']}/{e['language']}" for e in entries}  # all three tasks
    assert "Accuracy_Completeness" in out and "challenge mean over zh, en" in out
    assert (tmp_path / "judge_cache.jsonl").is_file()  # the default cache: next to the predictions


def test_evaluate_decodes_the_demo_then_judges(serve, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    server = serve(always(Reply()))
    out = tmp_path / "eval"
    rc = evaluate.main(["--ann", str(DEMO_ANN), "--out-dir", str(out), "--limit", "2", "--batch-size", "2",
                        "--num-workers", "0", "--num-beams", "1", "--max-new-tokens", "4", "--device", "cpu",
                        "--judge-url", server.url, "--judge-model", "judge-under-test"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(server.requests) == 2
    asked = [r["body"]["messages"][1]["content"] for r in server.requests]
    assert all(any(rec["prediction"] in prompt for prompt in asked) for rec in records)
    assert json.loads((out / "judge_scores.json").read_text())["num_judged"] == 2


def test_evaluate_judge_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    ann, predictions = write_corpus(tmp_path, DIALOGUES[:1])
    assert evaluate.main(["--judge", str(predictions), "--ann", str(ann)]) == 2
    assert capsys.readouterr().err.strip() == "error: judge.base_url is empty: pass --judge-url or set " \
                                              "judge.base_url in the config"
    assert evaluate.main(["--judge", str(predictions), "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge needs --ann" in capsys.readouterr().err
    predictions.write_text('{"id": "d1", "task": "emotional_trajectory"}\n')
    assert evaluate.main(["--judge", str(predictions), "--ann", str(ann), "--judge-url", "http://127.0.0.1:9/v1",
                          "--judge-model", "m"]) == 2
    assert f"{predictions}:1: missing key(s) language, prediction" in capsys.readouterr().err
