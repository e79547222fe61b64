"""Does the model listen? Train the tiny model on synthetic dialogues whose only emotion cue is prosody, with the
audio and with the audio silenced, and score both on held-out dialogues.

    python scripts/learning_experiment.py            # about 15 min on 2 CPU cores; prints and saves the table

Steps (each one a plain command of this repo, printed as it runs):
1. `scripts/make_demo_corpus.py` generates a corpus: espeak-ng voices whose pitch, rate and volume follow the
   turn's emotion, sentences without emotion words, held-out dialogues with unseen sentences.
2. `train.py --cfg-path configs/demo_learning.yaml` trains on the dialogues plus one emotion-recognition sample
   per training turn (multi-task, as SALMONN itself is trained), with audio, then with `datasets.silence_audio=true`
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

from metrics import EMOTIONS, canonical_emotion, emotion_trajectory_scores, extract_emotions  # noqa: E402

CONFIG = "configs/demo_learning.yaml"
LABEL_WORDS = {"en": {e: e for e in EMOTIONS},
               "zh": {"happy": "开心", "sad": "难过", "anger": "生气", "fear": "害怕", "neutral": "平静",
                      "surprise": "惊讶", "disgust": "厌恶"}}


def run(cmd: list[str]) -> float:
    """Runs one step of the experiment, failing loudly; returns its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def dialogues(ann_path: Path) -> list[dict]:
    return [e for e in json.loads(ann_path.read_text(encoding="utf-8"))["annotation"] if "turns" in e]


def turn_recognition(ann_path: Path, keep_dialogues: bool) -> Path:
    """One `emotion_recognition` sample per dialogue turn (the turn's audio -> its label word), written beside the
    annotation (same relative audio paths). For training, with the dialogues: multi-task data, as SALMONN itself
    is trained; for testing, alone: does the model hear the emotion of a single turn?"""
    data = json.loads(ann_path.read_text(encoding="utf-8"))["annotation"]
    turns = [{"id": f"{e['id']}_turn{k}", "path": t["path"], "task": "emotion_recognition", "Q": "",
              "language": e["language"], "text": LABEL_WORDS.get(e["language"], LABEL_WORDS["en"])[t["emotion"]]}
             for e in data if "turns" in e for k, t in enumerate(e["turns"], start=1)]
    out = ann_path.with_name(ann_path.stem + ("_with_turns.json" if keep_dialogues else "_turns.json"))
    out.write_text(json.dumps({"annotation": (data if keep_dialogues else []) + turns}, ensure_ascii=False),
                   encoding="utf-8")
    return out


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


def turn_recognition_accuracy(predictions: Path) -> float:
    """Share of held-out turns whose answer's first emotion word is the turn's label."""
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    hits = [(extract_emotions(r["prediction"]) or [None])[0] == canonical_emotion(r["reference"]) for r in records]
    return 100.0 * sum(hits) / len(hits)


def table(rows: dict[str, dict[str, float]], chance: dict[str, float], n_test: int) -> str:
    lines = ["| run | trajectory: per-turn accuracy | trajectory: exact sequence | single-turn recognition "
             "| training time |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['turn_accuracy']:.1f} % | {r['exact_match']:.1f} % "
                     f"| {r['turn_recognition']:.1f} % | {r['train_s'] / 60:.1f} min |")
    lines.append(f"| chance: uniform / majority label | {chance['uniform']:.1f} % / {chance['majority']:.1f} % "
                 f"| ~0 % | {chance['uniform']:.1f} % / {chance['majority']:.1f} % | - |")
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
    train_ann = turn_recognition(ann / "train.json", keep_dialogues=True)
    test_turns = turn_recognition(ann / "test.json", keep_dialogues=False)

    rows = {}
    for name, silence in (("audio", "false"), ("audio silenced", "true")):
        run_dir = out / name.replace(" ", "_")
        options = [f"datasets.train_ann_path={train_ann}", f"datasets.valid_ann_path={ann / 'valid.json'}",
                   f"datasets.test_ann_path={ann / 'test.json'}", f"datasets.silence_audio={silence}",
                   f"run.output_dir={run_dir}", *args.options]
        train_s = run([sys.executable, "train.py", "--cfg-path", CONFIG, "--options", *options])
        ckpt = sorted(run_dir.glob("checkpoint_step*.pth"), key=lambda p: int(p.stem.split("step")[1]))[-1]
        run([sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(ann / "test.json"),
             "--out-dir", str(run_dir / "eval"), "--options", *options, f"model.ckpt={ckpt}"])
        run([sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(test_turns),
             "--out-dir", str(run_dir / "eval_turns"), "--options", *options, f"model.ckpt={ckpt}"])
        rows[name] = {**score(run_dir / "eval" / "predictions.jsonl", test), "train_s": train_s,
                      "turn_recognition": turn_recognition_accuracy(run_dir / "eval_turns" / "predictions.jsonl")}

    report = table(rows, chance_levels(train, test), len(test))
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
