"""Metrics on cases small enough to compute by hand."""

import itertools

import pytest
import sacrebleu

import metrics
from humdial import trajectory
from humdial.scoring import HumDialScorer
from tools.demo_answers import ANSWER_WORDS, LABEL_WORDS


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


@pytest.mark.parametrize("word, label", [
    ("欢欣鼓舞", "happy"), ("振奋", "happy"), ("雀跃", "happy"), ("失落", "sad"), ("心疼", "sad"),
    ("恼怒", "anger"), ("烦躁", "anger"), ("忐忑", "fear"), ("担忧", "fear"), ("震惊", "surprise"),
    ("好奇", "surprise"), ("反胃", "disgust"), ("嫌弃", "disgust"), ("淡定", "neutral"), ("平稳", "neutral"),
    ("elated", "happy"), ("thrilled", "happy"), ("excitement", "happy"), ("grief", "sad"),
    ("heartbroken", "sad"), ("disappointment", "sad"), ("irritation", "anger"), ("rage", "anger"),
    ("frustration", "anger"), ("dread", "fear"), ("panic", "fear"), ("nervousness", "fear"),
    ("astonishment", "surprise"), ("shock", "surprise"), ("revulsion", "disgust"), ("grossed out", "disgust"),
    ("composed", "neutral"), ("at ease", "neutral"),
])
def test_synonym_families_in_both_languages(word, label):
    sentence = f"那时候有点{word}。" if metrics.is_chinese(word) else f"Back then I felt {word}."
    assert metrics.extract_emotions(sentence) == [label]


def test_a_word_for_a_pleasant_surprise_names_surprise_and_happy():
    assert metrics.extract_emotions("这份礼物带来了惊喜") == ["happy", "surprise"]


def test_english_words_match_whole_words_only():
    assert metrics.extract_emotions("A sadist called it madness: a grossly shocking scaredy-cat.") == []


@pytest.mark.parametrize("answer", [
    "She was not happy about it.", "He is no longer angry.", "They weren't at all scared.", "There was no fear left.",
    "你已经不再生气了。", "我当时没有害怕。", "别担心。", "你别紧张。", "他并不是很难过。", "我没有感到厌恶。",
    "后来就没有了恐惧。",
])
def test_negated_emotion_words_name_nothing(answer):
    assert metrics.extract_emotions(answer) == []


def test_negated_forms_that_are_words_keep_their_meaning():
    assert metrics.extract_emotions("孩子有些不开心，也略感不安；his friend was unhappy.") == ["sad", "fear", "sad"]


def test_words_ending_in_a_negator_character_do_not_negate():
    assert metrics.extract_emotions("那天特别开心，告别时又很伤感，忍不住害怕。") == ["happy", "sad", "fear"]


def test_words_of_one_clause_share_a_turn_slot():
    assert trajectory.emotion_slots("你先是紧张不安，后来又惊讶又欢喜，最后平静下来。") \
        == [("fear",), ("surprise", "happy"), ("neutral",)]
    assert trajectory.emotion_slots("You moved from rage and frustration over the delay to relief and joy.") \
        == [("anger",), ("happy",)]


def test_from_x_to_y_to_z_gives_one_slot_per_stage():
    assert trajectory.emotion_slots("从沮丧到惊讶再到欣喜") == [("sad",), ("surprise",), ("happy",)]
    assert trajectory.emotion_slots("You went from dread to astonishment to delight.") \
        == [("fear",), ("surprise",), ("happy",)]
    assert trajectory.emotion_slots("愤怒、惊讶、平静") == [("anger",), ("surprise",), ("neutral",)]  # a list of stages


def test_verbs_ending_in_dao_do_not_split_a_turn():
    assert trajectory.emotion_slots("闻到那股味道感到厌恶和反胃，收到好消息后就开心了") == [("disgust",), ("happy",)]


def test_aligned_emotions_gives_one_tuple_per_turn_and_ignores_retelling():
    answer = "起初你很恐惧，接着转为惊喜。总之是从恐惧到惊喜。"
    assert trajectory.aligned_emotions(answer, 3) == [("fear",), ("happy", "surprise"), ("fear",)]
    assert trajectory.aligned_emotions(answer, 2) == [("fear",), ("happy", "surprise")]
    assert trajectory.aligned_emotions("I can't tell.", 2) == [(), ()]


def test_a_turn_is_right_when_its_label_is_in_its_slot():
    gold = [["surprise", "disgust", "neutral"], ["happy", "fear", "neutral"]]
    answers = ["一开始好奇又兴奋，后来震惊而且反感。", "You were thrilled, then nervous and a bit surprised."]
    scores = trajectory.emotion_trajectory_scores(gold, answers)
    assert (scores.turn_accuracy, scores.exact_match) == (100.0, 100.0)


def test_final_neutral_question_turn_is_not_scored():
    gold = [["sad", "anger", "neutral"]]
    for answer in ("你从难过变得愤怒。", "你从难过变得愤怒，最后平静。", "你从难过变得愤怒，最后释然。"):
        scores = trajectory.emotion_trajectory_scores(gold, [answer])
        assert (scores.turn_accuracy, scores.exact_match, scores.num_turns) == (100.0, 100.0, 2)
    assert trajectory.emotion_trajectory_scores(gold, ["你一直很平静。"]).turn_accuracy == 0.0
    assert trajectory.scored_turns(["sad", "anger", "neutral"]) == ["sad", "anger"]


def test_a_final_turn_with_another_label_and_a_lone_neutral_turn_are_scored():
    assert trajectory.scored_turns(["happy", "neutral", "sad"]) == ["happy", "neutral", "sad"]
    assert trajectory.scored_turns(["neutral"]) == ["neutral"]
    scores = trajectory.emotion_trajectory_scores([["happy", "sad"], ["neutral"]], ["First glad.", "Calm."])
    assert (scores.turn_accuracy, scores.num_turns) == (pytest.approx(200 / 3), 3)


def test_a_fixed_answer_scores_low_against_varied_gold():
    moods = ["happy", "sad", "anger", "fear", "surprise", "disgust"]
    gold = [[a, b, "neutral"] for a, b in itertools.permutations(moods, 2)]
    words = LABEL_WORDS["zh"]
    best = max(trajectory.emotion_trajectory_scores(gold, [f"你先是{words[x]}，后来{words[y]}，最后平静了下来。"] *
                                                 len(gold)).turn_accuracy
               for x, y in itertools.product(words, repeat=2))
    assert best == pytest.approx(100 / 6)  # each stage right on 5 of 30 dialogues
    right = [f"你先是{words[a]}，后来{words[b]}，最后平静了下来。" for a, b, _ in gold]
    assert trajectory.emotion_trajectory_scores(gold, right).exact_match == 100.0


def test_trajectory_exact_match_and_per_turn_accuracy():
    gold = [["sad", "sad", "happy"], ["anger", "fear"], ["neutral"]]
    answers = [
        "Sad at first, still sad, then happy.",   # 3/3 turns, exact
        "The user was angry.",                     # 1/2 turns: the second turn is unnamed
        "calm, then happy",                        # 1/1 turns: slots beyond the gold turns are ignored
    ]
    scores = trajectory.emotion_trajectory_scores(gold, answers)
    assert scores.exact_match == pytest.approx(200 / 3)
    assert scores.turn_accuracy == pytest.approx(100 * 5 / 6)
    assert (scores.num_samples, scores.num_turns) == (3, 6)


def test_trajectory_reads_one_turn_per_clause():
    # "stayed sad" is one clause, so it names one turn; the answer must name each turn, "still sad" included
    gold = [["sad", "sad", "happy"]]
    scores = trajectory.emotion_trajectory_scores(gold, ["They stayed sad, then got happy."])
    assert scores.exact_match == 0.0
    assert scores.turn_accuracy == pytest.approx(100 / 3)
    assert trajectory.emotion_trajectory_scores(gold, ["Sad, still sad, then happy."]).exact_match == 100.0


def test_written_language_weighs_characters_against_words():
    assert metrics.written_language("收到offer以后特别开心") == "zh"
    assert metrics.written_language("She said 你好 and smiled at everyone.") == "en"
    assert metrics.written_language("  ...!") is None


def test_language_match():
    answers = ["你一开始很难过。", "You started sad.", "You started sad.", "", "难过"]
    assert metrics.language_match(answers, ["zh", "en", "zh", "en", "zh"]) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="2 answers but 1 languages"):
        metrics.language_match(["a", "b"], ["en"])
    with pytest.raises(ValueError, match="unknown languages"):
        metrics.language_match(["a"], ["fr"])


def test_score_group_on_a_blind_set_still_gives_language_match():
    records = [{"reference": "", "prediction": "你从难过变得开心。", "emotions": ["", "", ""]},
               {"reference": "", "prediction": "You went from sad to happy.", "emotions": ["", "", ""]}]
    assert HumDialScorer().group_scores("emotional_trajectory", "zh", records) == {"language_match": 50.0}
    assert HumDialScorer().group_scores("asr", "en", [{"reference": "", "prediction": "hello there"}]) \
        == {"language_match": 100.0}


def test_score_group_with_references_and_labels():
    records = [{"reference": "你从难过变得开心。", "prediction": "你从难过变得开心。",
                "emotions": ["sad", "happy", "neutral"]}]
    scores = HumDialScorer().group_scores("emotional_trajectory", "zh", records)
    assert scores == {"bleu": pytest.approx(100.0), "rouge_l": pytest.approx(100.0), "emotion_exact": 100.0,
                      "emotion_turn_acc": 100.0, "language_match": 100.0}
    with pytest.raises(ValueError, match="lack gold per-turn emotion labels"):
        HumDialScorer().group_scores("emotional_trajectory", "zh", [dict(records[0], emotions=["sad", "", "neutral"])])


def test_the_metric_reads_every_demo_answer_word_as_its_label():
    """The demo corpus's answers (tools.demo_answers) are written with these words: each must be read back as the
    label it stands for, alone, by the lexicon the metrics use."""
    for language, words in ANSWER_WORDS.items():
        for label, synonyms in words.items():
            for word in synonyms:
                assert label in metrics.extract_emotions(word), (language, label, word)
    for language, words in LABEL_WORDS.items():
        assert all(label in metrics.extract_emotions(word) for label, word in words.items()), language
