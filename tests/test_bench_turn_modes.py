"""benchmarks/bench_turn_modes.py: its per-part FLOP composition (what it reports at full size) agrees with a whole
training step (and a whole prefill) counted on the tiny model in every turn mode, the shapes it records follow
the modes' rules, and its quick run prints all three modes and writes its files without replacing any."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from benchmarks import bench_turn_modes
from dataset_v1 import read_annotation

ROOT = Path(__file__).resolve().parents[1]
WINDOWS_PER_CLIP = 88  # 30 s of Whisper frames at 0.333 s windows (docs/design.md "A batch")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert bench_turn_modes.main(["--quick", "--llm", "7b", "--out", str(out)]) == 0
    [json_path] = out.glob("*.json")
    return printed.getvalue(), json.loads(json_path.read_text()), out


@pytest.mark.parametrize("mode", list(bench_turn_modes.MODES))
def test_composition_matches_the_whole_counted_step_on_the_tiny_model(quick_run, mode):
    _, results, _ = quick_run
    result = results["modes"][mode]
    check = result["cross_check"]
    assert check["whole_step"] > 1e9  # a real count (the tiny step is ~5 GFLOP), not two zeros
    assert check["composed"] == pytest.approx(check["whole_step"], rel=0.02)
    inference = result["inference"]
    assert inference["tiny_composed"] == pytest.approx(inference["tiny_whole"], rel=0.02)
    assert result["flops"]["llm_attention"] > 0  # attention is counted (math path), not left out


def turns_of(ids: list[str]) -> list[int]:
    turns = {entry["id"]: len(entry["turns"]) for entry in read_annotation(ROOT / "data/demo/ann/train.json")}
    return [turns[i] for i in ids]


def test_recorded_shapes_follow_the_turn_modes(quick_run):
    """Whisper passes and speech tokens per mode, from the annotation: concat one 30 s clip (88 tokens) per
    dialogue, per_turn one clip (88 tokens) per turn; packed the turns of a dialogue (< 30 s) in one clip, trimmed
    to the windows of its turns; no padding in the packed row."""
    _, results, _ = quick_run
    [a], [b], [c] = (results["modes"][m]["batches"] for m in "abc")
    dialogues = len(a["ids"])
    turns = sum(turns_of(a["ids"]))
    assert b["ids"] == c["ids"] == a["ids"] and dialogues == 2
    assert a["whisper"][0] == dialogues and a["speech_tokens"] == WINDOWS_PER_CLIP * dialogues
    assert b["whisper"][0] == turns and b["speech_tokens"] == WINDOWS_PER_CLIP * turns
    assert c["whisper"][0] == dialogues
    assert turns * 3 <= c["speech_tokens"] < b["speech_tokens"]  # every turn >= 1 s: >= 3 windows
    assert c["qformer"][0] == c["speech_tokens"]  # trimmed: the Q-Former runs on the turns' windows only
    assert c["llm"] == [1, sum(c["lengths"])]
    assert results["modes"]["c"]["shapes"]["padding_share"] == 0
    goal = results["goal"]
    assert goal["holds"] == (goal["b_over_c"] >= bench_turn_modes.GOAL and goal["a_over_c"] > 1)


def test_quick_run_prints_all_three_modes_and_writes_its_files(quick_run):
    printed, results, out = quick_run
    for label, _ in bench_turn_modes.MODES.values():
        assert printed.count(label) == 1  # the FLOPs table names each mode once
    for name in "abc":
        assert printed.count(f"| ({name}) ") >= 4  # FLOPs, cross-check, wall time, inference
    assert "Goal (c) >= 2.5x" in printed
    [markdown] = out.glob("*.md")
    assert markdown.read_text() in printed
    assert set(results["modes"]) == {"a", "b", "c"}
    assert all(math.isfinite(m["wall"]["ms_per_dialogue"]) and m["inference"]["ttft_ms"] > 0
               for m in results["modes"].values())


def test_results_never_replace_a_file(tmp_path):
    bench_turn_modes.write_new(tmp_path, "run", {"x": 1}, "first\n")
    with pytest.raises(SystemExit, match="not overwritten"):
        bench_turn_modes.write_new(tmp_path, "run", {"x": 2}, "second\n")
    assert json.loads((tmp_path / "run.json").read_text()) == {"x": 1}
    assert (tmp_path / "run.md").read_text() == "first\n"
