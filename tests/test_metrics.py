"""Metrics on cases small enough to compute by hand."""

import pytest
import sacrebleu

import metrics


def test_wer_one_substitution_in_three_words():
    assert metrics.wer(["a b c"], ["a x c"]) == pytest.approx(100 / 3)


def test_wer_is_corpus_level_edits_over_reference_words():
    # one substitution in the first pair, one insertion in the second: 2 edits / 5 reference words
    assert metrics.wer(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(40.0)


def test_wer_normalises_case_punctuation_and_contractions():
    assert metrics.wer(["Hello, World! It's fine."], ["hello world it is fine"]) == 0.0


def test_wer_rejects_all_empty_references_and_length_mismatch():
    with pytest.raises(ValueError, match="empty"):
        metrics.wer(["", "[noise]"], ["a", "b"])
    with pytest.raises(ValueError, match="2 references but 1"):
        metrics.wer(["a", "b"], ["a"])


def test_cer_chinese_one_substitution_in_five_characters():
    assert metrics.cer(["今天天气好"], ["今天天汽好。"]) == pytest.approx(20.0)


def test_cer_ignores_spaces_and_punctuation_and_counts_deletions():
    assert metrics.cer(["今天 天气，好！"], ["今天天气好"]) == 0.0
    assert metrics.cer(["我爱北京"], ["我北京"]) == pytest.approx(25.0)


def test_bleu_matches_hand_computed_geometric_mean():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3 with brevity penalty 1: (1/12) ** (1/4)
    score = metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert score == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)


def test_bleu_chinese_is_character_tokenized():
    # character n-gram precisions 4/6, 3/5, 2/4, 1/3: (1/15) ** (1/4)
    score = metrics.bleu(["今天天气不错"], ["今天天气很好"], language="zh")
    assert score == pytest.approx(100 * (1 / 15) ** 0.25, abs=1e-6)


def test_bleu_equals_sacrebleu_corpus_bleu():
    refs = ["the quick brown fox jumps over the lazy dog", "a man is playing a guitar on stage"]
    hyps = ["the fast brown fox jumps over a lazy dog", "a man plays the guitar on the stage"]
    assert metrics.bleu(refs, hyps) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_lcs_length():
    assert metrics.lcs_length(list("abcde"), list("ace")) == 3
    assert metrics.lcs_length(list("abc"), []) == 0
    assert metrics.lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_rouge_l_english_word_level():
    # LCS(a b c d e, a c e f) = 3: P = 3/4, R = 3/5, F1 = 2/3
    assert metrics.rouge_l(["A b, c d e."], ["a c e f"]) == pytest.approx(200 / 3)


def test_rouge_l_chinese_character_level_and_mean_over_pairs():
    # LCS = 我北京天安门 (6): P = 6/8, R = 6/7, F1 = 0.8; the second pair shares nothing
    assert metrics.rouge_l(["我爱北京天安门"], ["我在北京看天安门"], language="zh") == pytest.approx(80.0)
    assert metrics.rouge_l(["我爱北京天安门", "你好"], ["我在北京看天安门", "再见"], language="zh") \
        == pytest.approx(40.0)


def test_extract_emotions_english_in_order_with_inflections():
    answer = ("In the first turn the speaker sounds Happy; in the second, unhappy and sad. "
              "Then they were angry, then scared, then surprised, disgusted and finally calm.")
    assert metrics.extract_emotions(answer) == ["happy", "sad", "sad", "anger", "fear", "surprise", "disgust",
                                                "neutral"]


def test_extract_emotions_does_not_match_inside_other_words():
    assert metrics.extract_emotions("The average sadist was made to smile.") == []


def test_extract_emotions_chinese_with_negated_forms():
    answer = "用户第一轮很开心，第二轮不开心，第三轮非常愤怒，然后有些害怕，接着很吃惊，最后感到厌恶，语气平静。"
    assert metrics.extract_emotions(answer) == ["happy", "sad", "anger", "fear", "surprise", "disgust", "neutral"]


def test_canonical_emotion_accepts_labels_in_both_languages():
    assert metrics.canonical_emotion(" Angry ") == "anger"
    assert metrics.canonical_emotion("伤心") == "sad"
    with pytest.raises(ValueError, match="unknown emotion label 'bored'"):
        metrics.canonical_emotion("bored")


def test_trajectory_exact_match_and_per_turn_accuracy():
    gold = [["sad", "sad", "happy"], ["anger", "fear"], ["neutral"]]
    answers = [
        "Sad at first, still sad, then happy.",   # 3/3 turns, exact
        "The user was angry.",                     # 1/2 turns: the second turn is missing
        "calm, then happy",                        # 1/1 turns, but an extra emotion breaks the exact match
    ]
    scores = metrics.emotion_trajectory_scores(gold, answers)
    assert scores.exact_match == pytest.approx(100 / 3)
    assert scores.turn_accuracy == pytest.approx(100 * 5 / 6)
    assert (scores.num_samples, scores.num_turns) == (3, 6)


def test_trajectory_does_not_collapse_repeats():
    # "stayed sad" names sad once, so the second sad turn is missing
    scores = metrics.emotion_trajectory_scores([["sad", "sad", "happy"]], ["They stayed sad, then got happy."])
    assert scores.exact_match == 0.0
    assert scores.turn_accuracy == pytest.approx(100 / 3)
