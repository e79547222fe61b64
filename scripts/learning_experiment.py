"""Does the model listen? Train the tiny model on synthetic dialogues whose only emotion cue is prosody, with the
audio and with the audio silenced, and score both on held-out dialogues.

    python scripts/learning_experiment.py            # about 15 min on 2 CPU cores; prints and saves the table

Steps (each one a plain command of this repo, printed as it runs):
1. `scripts/make_demo_corpus.py` generates a corpus: espeak-ng voices whose pitch, rate and volume follow the
   turn's emotion, sentences without emotion words, held-out dialogues with unseen sentences.
2. `train.py --cfg-path configs/demo_learning.yaml` trains with audio, then with `datasets.silence_audio=true`
   (every clip replaced by zeros of the same length: the model can learn the answer's form and the label prior,
   not the emotions).
3. `evaluate.py` decodes the held-out test dialogues of each run; emotion-trajectory accuracy (per turn and
   exact sequence, `metrics.emotion_trajectory_scores`) is computed from its predictions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metrics import canonical_emotion, emotion_trajectory_scores  # noqa: E402

CONFIG = "configs/demo_learning.yaml"
EMOTIONS = ("happy", "sad", "anger", "fear", "neutral", "surprise", "disgust")


def run(cmd: list[str]) -> float:
    """Runs one step of the experiment, failing loudly; returns its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def dialogues(ann_path: Path) -> list[dict]:
    return [e for e in json.loads(ann_path.read_text(encoding="utf-8"))["annotation"] if "turns" in e]


def check_held_out(train: list[dict], test: list[dict]) -> None:
    """Scores must come from dialogues the model never trained on."""
    shared = {e["id"] for e in train} & {e["id"] for e in test}
    if shared:
        raise ValueError(f"{len(shared)} test dialogues are also training dialogues, e.g. {sorted(shared)[:3]}")


def chance_levels(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Per-turn accuracy of guessing: uniformly, and always answering the training set's most common label."""
    prior = Counter(canonical_emotion(t["emotion"]) for e in train for t in e["turns"])
    majority = prior.most_common(1)[0][0]
    gold = [canonical_emotion(t["emotion"]) for e in test for t in e["turns"]]
    return {"uniform": 100.0 / len(EMOTIONS), "majority": 100.0 * sum(g == majority for g in gold) / len(gold)}


def score(predictions: Path, test: list[dict]) -> dict[str, float]:
    """Emotion-trajectory scores of one run, over exactly the held-out dialogues."""
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_id = {r["id"]: r for r in records}
    missing = [e["id"] for e in test if e["id"] not in by_id]
    if missing or len(by_id) != len(test):
        raise ValueError(f"{predictions}: predictions do not cover the held-out set exactly (missing {missing[:3]}, "
                         f"{len(by_id)} predictions for {len(test)} dialogues)")
    gold = [[t["emotion"] for t in e["turns"]] for e in test]
    scores = emotion_trajectory_scores(gold, [by_id[e["id"]]["prediction"] for e in test])
    return {"turn_accuracy": scores.turn_accuracy, "exact_match": scores.exact_match}


def table(rows: dict[str, dict[str, float]], chance: dict[str, float], n_test: int) -> str:
    lines = [f"| run | per-turn accuracy | exact sequence | training time |",
             "| --- | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['turn_accuracy']:.1f} % | {r['exact_match']:.1f} % | {r['train_s'] / 60:.1f} min |")
    lines.append(f"| chance: uniform / majority label | {chance['uniform']:.1f} % / {chance['majority']:.1f} % "
                 f"| ~0 % | - |")
    return "\n".join(lines) + f"\n\n({n_test} held-out dialogues)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo_learning", help="corpus, checkpoints, predictions and the report")
    ap.add_argument("--num-dialogues", type=int, default=1200)
    ap.add_argument("--options", nargs="*", default=[], help="extra config overrides for both runs")
    args = ap.parse_args()
    out = ROOT / args.out
    corpus = out / "corpus"
    if not (corpus / "ann" / "test.json").is_file():
        run([sys.executable, "scripts/make_demo_corpus.py", "--num-dialogues", str(args.num_dialogues),
             "--out", str(corpus)])
    ann = corpus / "ann"
    train, test = dialogues(ann / "train.json"), dialogues(ann / "test.json")
    check_held_out(train + dialogues(ann / "valid.json"), test)

    rows = {}
    for name, silence in (("audio", "false"), ("audio silenced", "true")):
        run_dir = out / name.replace(" ", "_")
        options = [f"datasets.train_ann_path={ann / 'train.json'}", f"datasets.valid_ann_path={ann / 'valid.json'}",
                   f"datasets.test_ann_path={ann / 'test.json'}", f"datasets.silence_audio={silence}",
                   f"run.output_dir={run_dir}", *args.options]
        train_s = run([sys.executable, "train.py", "--cfg-path", CONFIG, "--options", *options])
        ckpt = sorted(run_dir.glob("checkpoint_step*.pth"), key=lambda p: int(p.stem.split("step")[1]))[-1]
        run([sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(ann / "test.json"),
             "--out-dir", str(run_dir / "eval"), "--options", *options, f"model.ckpt={ckpt}"])
        rows[name] = {**score(run_dir / "eval" / "predictions.jsonl", test), "train_s": train_s}

    report = table(rows, chance_levels(train, test), len(test))
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
