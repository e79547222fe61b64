"""benchmarks/bench_inference.py on the tiny default: durations beyond the encoder's window are clipped with a
note, and Nota's efficiency figures (means after a warm-up, TTFT + TPOT) are printed beside the table."""
from __future__ import annotations

import json
import re

from benchmarks import bench_inference


def test_durations_are_clipped_to_the_window_with_a_note(capsys):
    assert bench_inference.window_durations([10.0, 2.5, 30.0, 5.0], 5.0) == [5.0, 2.5]
    assert "--durations 10 2.5 30 5: this model's encoder window is 5 s" in capsys.readouterr().err
    assert bench_inference.window_durations([10.0, 30.0], 30.0) == [10.0, 30.0]
    assert capsys.readouterr().err == ""


def test_the_default_durations_run_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_inference.main(["--batch-sizes", "1", "--new-tokens", "3", "--repeats", "2",
                                 "--json", str(out)]) == 0  # default --durations 10 30, tiny 5 s window
    printed = capsys.readouterr().out
    [result] = json.loads(out.read_text())["results"]
    assert result["audio_s"] == 5.0
    assert result["ttft_ms"] <= result["ttft_mean_ms"] and result["tpot_ms"] <= result["tpot_mean_ms"]
    line = re.search(r"5 s, batch 1, mean of the timed runs: TTFT ([\d.]+) s, TPOT ([\d.]+) s, inference time "
                     r"\(TTFT \+ TPOT\) ([\d.]+) s, peak memory [\d.]+ GB", printed)
    assert line is not None
    ttft, tpot, total = map(float, line.groups())
    assert abs(ttft - result["ttft_mean_ms"] / 1e3) < 1e-4 and abs(total - (ttft + tpot)) < 2e-4
