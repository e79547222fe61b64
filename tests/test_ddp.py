"""Two CPU processes (torchrun, gloo) take the same optimizer steps as one process on the combined batches,
with DDP and with FSDP."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_runner import ONE_LINEAR_STEP, assert_same_tensors, corpus_options, load, make_corpus, no_dropout, \
    run_train, train_losses

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs/demo.yaml")

LAUNCHER = """
import sys
import test_runner, train
test_runner.no_dropout(type("Patch", (), {"setattr": staticmethod(setattr)})())
sys.exit(train.main(sys.argv[1:]))
"""


# Two steps (a second forward after a synchronised backward is where DDP finds unused parameters).
TWO_LINEAR_STEPS = {**ONE_LINEAR_STEP, "iters_per_epoch": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_process(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batches of 4 samples."""
    out = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as monkeypatch:
        no_dropout(monkeypatch)
        assert run_train(corpus_options(corpus, out, batch_size_train=4, **TWO_LINEAR_STEPS)) == 0
    return out


def torchrun_two_processes(tmp_path: Path, options: list[str]) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), "--cfg-path", DEMO_CFG,
                           "--options", *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_combined_batch(corpus: Path, one_process: Path, tmp_path: Path,
                                                               fsdp: bool) -> None:
    # Each process: 2 micro-batches of 1 sample (accumulation, and DDP's no_sync on the first one).
    out = tmp_path / "out"
    options = corpus_options(corpus, out, batch_size_train=1, accum_grad_iters=2, fsdp=fsdp, **TWO_LINEAR_STEPS)
    result = torchrun_two_processes(tmp_path, options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in (out / "train.log").read_text()

    expected, got = load(one_process / "checkpoint_step2.pth"), load(out / "checkpoint_step2.pth")
    assert_same_tensors(expected["model"], got["model"], atol=1e-6)
    assert got["world_size"] == 2 and len(got["rng"]) == 2
    losses, expected_losses = train_losses(out), train_losses(one_process)
    assert [s for s, _ in losses] == [1, 2]
    assert [x for _, x in losses] == pytest.approx([x for _, x in expected_losses], rel=1e-6)
    assert got["valid"]["loss"] == pytest.approx(expected["valid"]["loss"], rel=1e-5)
