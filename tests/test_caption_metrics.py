"""metrics.py's captioning metrics against the values of aac-metrics (the AAC field's metrics library), its
unavailable-metric reasons, and the label accuracy of emotion recognition, speaker verification and closed-form QA.

Reference values: aac-metrics 0.6.0 (`preprocess_mono_sents`/`preprocess_mult_sents`, then `cider_d` and
`meteor`), run once by hand with Java 17 (aac-metrics cannot be a dependency here: its msclap dependency pins
transformers < 5). The first example's CIDEr-D is also the one printed in aac-metrics' README.
"""
from __future__ import annotations

import shutil

import pytest

import metrics
from metrics import (caption_gaps, caption_machine_gaps, caption_scores, label_accuracy, Scorer,
                     unavailable_scores)

needs_java = pytest.mark.skipif(shutil.which("java") is None or metrics._toolkit() is None,
                                reason="needs Java and pycocoevalcap (apt-get install default-jre-headless)")

README_CANDIDATES = ["a man is speaking", "rain falls"]
README_REFERENCES = [["a man speaks.", "someone speaks.",
                      "a man is speaking while a bird is chirping in the background"],
                     ["rain is falling hard on a surface"]]
OWN_CANDIDATES = ["A dog barks twice while cars pass by.", "Heavy rain falls on a metal roof.",
                  "Someone is typing on a keyboard.", "Birds are singing in the morning."]
OWN_REFERENCES = ["A dog is barking as traffic goes by.", "Rain is pouring onto a tin roof.",
                  "A person types quickly on a keyboard.", "Many birds chirp at dawn."]


@needs_java
def test_cider_d_matches_aac_metrics():
    readme = caption_scores(README_REFERENCES, README_CANDIDATES, ["cider_d"])
    assert readme == {"cider_d": pytest.approx(100 * 0.9613547163493906, abs=1e-6)}
    own = caption_scores(OWN_REFERENCES, OWN_CANDIDATES, ["cider_d"])
    assert own["cider_d"] == pytest.approx(100 * 1.255171054006733, abs=1e-6)


@needs_java
def test_meteor_matches_aac_metrics():
    scores = caption_scores(README_REFERENCES, README_CANDIDATES, ["meteor"])
    assert scores == {"meteor": pytest.approx(100 * 0.26338060861806095, abs=1e-6)}


def test_caption_scores_refuse_unknown_metrics_and_unpaired_lists():
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores(["a"], ["a"], ["cider"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        caption_scores(["a", "b"], ["a"])


def machine_gaps_with(monkeypatch, toolkit, java):
    """caption_machine_gaps on a machine with this toolkit folder (None: not installed) and Java or not."""
    monkeypatch.setattr(metrics, "_toolkit", lambda: toolkit)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java" if java else None)
    caption_machine_gaps.cache_clear()
    try:
        return caption_machine_gaps()
    finally:
        caption_machine_gaps.cache_clear()


def test_machine_gaps_name_what_to_install_where(monkeypatch, tmp_path):
    missing = machine_gaps_with(monkeypatch, None, True)
    assert set(missing) == set(metrics.CAPTION_METRICS) and "pip install" in missing["cider_d"]
    no_java = machine_gaps_with(monkeypatch, tmp_path, False)
    assert set(no_java) == set(metrics.CAPTION_METRICS) and "default-jre-headless" in no_java["meteor"]
    no_corenlp = machine_gaps_with(monkeypatch, tmp_path, True)
    assert set(no_corenlp) == {"spice", "spider"}
    assert str(tmp_path / "spice" / "lib") in no_corenlp["spice"]
    assert "stanford-corenlp-3.6.0.jar" in no_corenlp["spice"]
    lib = tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (lib / name).write_bytes(b"")
    assert machine_gaps_with(monkeypatch, tmp_path, True) == {}


def test_caption_gaps_per_group(monkeypatch):
    monkeypatch.setattr(metrics, "caption_machine_gaps", lambda: {})
    assert caption_gaps("asr", "en", 5) == {}
    assert caption_gaps("audiocaption_v2", "en", 5) == {}
    assert set(caption_gaps("audiocaption", "zh", 5)) == set(metrics.CAPTION_METRICS)
    single = caption_gaps("music_description", "en", 1)
    assert set(single) == {"cider_d", "spider"} and "at least 2 captions" in single["cider_d"]


def caption_records(task: str, pairs: list[tuple[str, str]], language: str = "en") -> list[dict]:
    return [{"task": task, "language": language, "reference": ref, "prediction": hyp} for ref, hyp in pairs]


@needs_java
def test_captioning_groups_get_cider_d_and_the_rest_is_reported_unavailable(monkeypatch):
    monkeypatch.setattr(metrics, "caption_machine_gaps", lambda: {"meteor": "m", "spice": "s", "spider": "s"})
    records = caption_records("audiocaption_v2", list(zip(OWN_REFERENCES, OWN_CANDIDATES)))
    records += caption_records("audiocaption", [("a bell rings", "a bell is ringing")])
    scores = Scorer().score(records)
    assert scores["audiocaption_v2/en/cider_d"] == pytest.approx(100 * 1.255171054006733, abs=1e-6)
    assert {"audiocaption_v2/en/bleu", "audiocaption_v2/en/rouge_l"} <= set(scores)
    assert not any(key.endswith(("meteor", "spice", "spider")) for key in scores)
    assert "audiocaption/en/cider_d" not in scores  # one caption: no CIDEr-D, and said why
    assert unavailable_scores(records) == {
        "audiocaption/en/cider_d": caption_gaps("audiocaption", "en", 1)["cider_d"], "audiocaption/en/meteor": "m",
        "audiocaption/en/spice": "s", "audiocaption/en/spider": "s", "audiocaption_v2/en/meteor": "m",
        "audiocaption_v2/en/spice": "s", "audiocaption_v2/en/spider": "s"}
    assert unavailable_scores(caption_records("audiocaption", [("", "x")] * 2)) == {}  # blind: nothing to score


@needs_java
def test_spider_is_the_mean_of_cider_d_and_spice(monkeypatch):
    """With SPICE's jars present the toolkit's Spice runs; here it is stood in for, to check the arithmetic."""
    class FakeSpice:
        def compute_score(self, refs, hyps):
            assert sorted(refs) == sorted(hyps) == [0, 1]
            return 0.25, []

    monkeypatch.setattr("pycocoevalcap.spice.spice.Spice", FakeSpice)
    scores = caption_scores(README_REFERENCES, README_CANDIDATES, ["spider"])
    assert scores == {"spider": pytest.approx((100 * 0.9613547163493906 + 25.0) / 2, abs=1e-6)}


def test_emotion_recognition_accuracy_reads_the_first_emotion_named():
    references = ["Angry", "neutral", "sad", "happy"]
    answers = ["The speaker sounds angry.", "Calm.", "Not sad at all, rather happy.", "joyful and excited"]
    assert label_accuracy("emotion_recognition", references, answers, "en") == pytest.approx(75.0)
    with pytest.raises(ValueError, match="names none of the emotions"):
        label_accuracy("emotion_recognition", ["bored"], ["bored"], "en")


def test_speaker_verification_accuracy_reads_yes_or_no():
    references = ["Yes", "no", "No.", "yes", "是"]
    answers = ["Yes, it is the same person.", "No, two people talk.", "yes", "I am not sure.", "是同一个人"]
    assert label_accuracy("speaker_verification", references, answers, "en") == pytest.approx(60.0)
    with pytest.raises(ValueError, match="neither yes nor no"):
        label_accuracy("speaker_verification", ["maybe"], ["yes"], "en")


def test_qa_accuracy_only_for_closed_form_answers():
    references = ["two", "yes", "a dog"]
    answers = ["There are two dogs.", "No, it is not.", "I hear a dog barking."]
    assert label_accuracy("QA", references, answers, "en") == pytest.approx(200 / 3)
    assert label_accuracy("QA", ["the speaker talks about the weather in paris", "yes"], ["x", "yes"], "en") is None


def test_accuracy_joins_the_scores_of_its_tasks():
    records = caption_records("speaker_verification", [("yes", "Yes."), ("no", "Yes.")])
    records += caption_records("QA", [("the man is reading a long list of names aloud", "he reads names")])
    scores = Scorer().score(records)
    assert scores["speaker_verification/en/accuracy"] == pytest.approx(50.0)
    assert "QA/en/accuracy" not in scores and "QA/en/bleu" in scores
    assert unavailable_scores(records) == {}


def test_unlabelled_references_make_accuracy_unavailable_not_a_crash():
    """A validation during training must not die on one bad label: the group's accuracy is reported missing."""
    records = caption_records("emotion_recognition", [("angry", "angry"), ("xxx", "sad")])
    scores = Scorer().score(records)
    assert "emotion_recognition/en/accuracy" not in scores and "emotion_recognition/en/bleu" in scores
    assert unavailable_scores(records) == {"emotion_recognition/en/accuracy": "1 of 2 references give no label "
                                           "(e.g. 'xxx' names none of the emotions): label every sample"}
