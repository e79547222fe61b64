"""The demo corpus's answers: the words for each emotion label and the varied trajectory answers that
scripts/make_demo_corpus.py writes and the experiments read back. Demo data, not a challenge rule: the metric's
own lexicon is metrics.EMOTION_WORDS, which reads every word here (tests/test_metrics.py)."""
from __future__ import annotations

import random

# The plain word for each label in each language (the demo corpus's answers use it).
LABEL_WORDS = {
    "en": {"happy": "happy", "sad": "sad", "anger": "angry", "fear": "afraid", "neutral": "neutral",
           "surprise": "surprised", "disgust": "disgusted"},
    "zh": {"happy": "开心", "sad": "难过", "anger": "生气", "fear": "害怕", "neutral": "平静",
           "surprise": "惊讶", "disgust": "反感"},
}


# Words the demo corpus's answers draw on, several per label, as real answers vary them (metrics reads them all).
ANSWER_WORDS = {
    "en": {"happy": ("happy", "glad", "joyful", "delighted", "cheerful", "excited"),
           "sad": ("sad", "upset", "disappointed", "heartbroken", "sorrowful"),
           "anger": ("angry", "annoyed", "furious", "frustrated", "irritated"),
           "fear": ("afraid", "scared", "anxious", "nervous", "worried"),
           "neutral": ("calm", "relaxed", "composed"),
           "surprise": ("surprised", "amazed", "astonished", "shocked"),
           "disgust": ("disgusted", "revolted", "repulsed", "sickened")},
    "zh": {"happy": ("开心", "高兴", "兴奋", "喜悦", "欣喜", "愉快"),
           "sad": ("难过", "伤心", "失落", "沮丧", "悲伤"),
           "anger": ("生气", "愤怒", "恼火", "气愤"),
           "fear": ("害怕", "担心", "紧张", "焦虑", "恐惧"),
           "neutral": ("平静", "平和", "冷静"),
           "surprise": ("惊讶", "吃惊", "震惊", "诧异"),
           "disgust": ("厌恶", "恶心", "嫌弃")},  # not 反感: "反感到X" reads as 感到 (feel), not "to X"
}
_OPENINGS = {"en": ("You started out {}", "At first you felt {}", "In the beginning you were {}",
                    "You went from {}"),
             "zh": ("你一开始很{}", "你先是感到{}", "刚开始你有些{}", "你的情绪从{}")}
_STEPS = {"en": (", then became {}", ", then felt {}", ", and later you were {}", " to {}"),
          "zh": ("，后来变得{}", "，接着又感到{}", "，然后有些{}", "到{}")}
_STILL = {"en": ", then were still {}", "zh": "，接着依然{}"}
_CALM_ENDINGS = {"en": (", and now you sound calm again", "; by the end you were calm"),
                 "zh": ("，现在已经平静了下来", "，最后回归平静")}


def trajectory_summary(emotions: list[str], language: str, rng: random.Random | None = None) -> str:
    """The demo corpus's trajectory answer, in varied natural language as real answers are: a synonym for each
    turn's emotion (sometimes two for one turn), "from X to Y" or "first ..., then ..." structure, "still X"
    for a repeat, and a closing neutral question turn sometimes called calm, sometimes left unnamed.

    rng None gives the plain form (the first word of each label, no variation): tests read it back."""
    pick = (lambda options: options[0]) if rng is None else rng.choice
    words = ANSWER_WORDS.get(language, ANSWER_WORDS["en"])
    lang = language if language in _OPENINGS else "en"
    closing_calm = len(emotions) > 1 and emotions[-1] == "neutral"  # HumDial's closing question turn
    named = emotions[:-1] if closing_calm else emotions
    style = pick(range(len(_OPENINGS[lang])))  # 0..2: "first ..., then ...", 3: "from X to Y to Z"

    def said(label: str) -> str:
        first = pick(words[label])
        if rng is not None and rng.random() < 0.15:  # one turn, two words ("upset and disappointed", 又难过又失落)
            second = rng.choice([w for w in words[label] if w != first] or [first])
            return f"{first}又{second}" if lang == "zh" else f"{first} and {second}"
        return first

    text = _OPENINGS[lang][style].format(said(named[0]))
    for previous, label in zip(named, named[1:]):
        if label == previous and style != 3:
            text += _STILL[lang].format(said(label))
        else:
            text += (_STEPS[lang][3] if style == 3 else _STEPS[lang][pick(range(3))]).format(said(label))
    if closing_calm and (rng is None or rng.random() < 0.5):
        text += pick(_CALM_ENDINGS[lang])
    return text + ("。" if lang == "zh" else ".")
