"""benchmarks/gpu_check.py: `--small` end to end on CPU (what CI runs; the full-size run needs a GPU), its
preconditions, and that a run never overwrites another's results."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_check

TRAIN_FIELDS = {"gradient_checkpointing", "batch", "steps", "padded_tokens", "speech_tokens", "answer_tokens",
                "seconds_per_step", "samples_per_s", "tokens_per_s", "target_tokens_per_s", "flops_per_step", "mfu",
                "peak_flops_source", "peak_memory_gib", "memory_source", "predicted_peak_gib", "predicted_phase"}
INFERENCE_FIELDS = {"audio_s", "encode_ms", "ttft_ms", "tpot_ms", "ttft_mean_ms", "tpot_mean_ms", "batches",
                    "new_tokens", "memory_source"}
BATCH_FIELDS = {"answers_per_s", "peak_memory_gib", "predicted_peak_gib"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_small_run_writes_every_figure(tmp_path, capsys):
    assert gpu_check.main(["--small", "--out", str(tmp_path)]) == 0
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"]
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {"device", "versions", "small", "seconds", "memory_source", "results"} <= set(report)
    assert report["small"] is True and list(report["results"]) == ["tiny"]
    result = report["results"]["tiny"]
    assert {"config", "build_seconds", "parameters", "trainable", "weights_dtype", "train", "inference"} <= set(result)
    assert 0 < result["trainable"] < result["parameters"]

    assert [t["gradient_checkpointing"] for t in result["train"]] == [False, True]
    for t in result["train"]:
        assert set(t) == TRAIN_FIELDS
        for key in TRAIN_FIELDS - {"gradient_checkpointing", "peak_flops_source", "memory_source", "predicted_phase"}:
            assert positive(t[key]), (key, t[key])
        assert t["padded_tokens"] > t["speech_tokens"] + t["answer_tokens"]
    plain, checkpointed = result["train"]
    assert checkpointed["flops_per_step"] == plain["flops_per_step"]  # model FLOPs: recomputation not credited
    assert checkpointed["predicted_peak_gib"] <= plain["predicted_peak_gib"]

    assert [d["audio_s"] for d in result["inference"]] == list(gpu_check.SMALL.audio_seconds)
    for d in result["inference"]:
        assert set(d) == INFERENCE_FIELDS
        assert all(positive(d[k]) for k in ("encode_ms", "ttft_ms", "tpot_ms"))
        assert sorted(map(int, d["batches"])) == [4, 16]
        for figures in d["batches"].values():
            assert set(figures) == BATCH_FIELDS and all(positive(v) for v in figures.values())
    md = next(tmp_path.glob("*.md")).read_text()
    assert md.count("| tiny |") == 2 + 2 * 2  # 2 training rows, 2 audio lengths x 2 batch sizes
    assert "wrote" in capsys.readouterr().out


def test_results_never_overwrite_an_earlier_run(tmp_path):
    taken = set()
    for written in ("both", "json only", "md only"):
        json_path, md_path = gpu_check.results_paths(tmp_path)
        assert not json_path.exists() and not md_path.exists() and json_path.stem == md_path.stem
        assert not {json_path, md_path} & taken
        for path in {"both": (json_path, md_path), "json only": (json_path,), "md only": (md_path,)}[written]:
            path.write_text("")
        taken |= {json_path, md_path}


def test_without_cuda_the_full_check_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--llm", "7b", "--out", str(tmp_path / "out")])
    message = str(stop.value)
    assert message.startswith("gpu_check: no CUDA device visible") and "--small" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(gpu_check, "PACKAGES", ("torch", "no_such_package_xyz"))
    with pytest.raises(SystemExit, match=r"^gpu_check: missing packages: no_such_package_xyz \(pip install"):
        gpu_check.check_packages()


def test_too_little_gpu_memory_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    with pytest.raises(SystemExit, match=r"Some GPU has 10.0 GiB free of 80.0; the largest phase needs ~\d+"):
        gpu_check.check_gpu(gpu_check.planned_need(["13b"], {"13b": 2}))
