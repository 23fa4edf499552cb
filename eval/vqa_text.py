"""Answer normalisation and the soft VQA accuracy shared by TextVQA and VQAv2.

Both benchmarks are scored by the official VQA rules (also used by EvalAI and MMF's m4c evaluator): answers are
normalised (lower case, punctuation, periods, number words to digits, articles, contractions), and a prediction
earns, averaged over the 10 leave-one-out subsets of the 10 human answers (10 choose 9), min(1, matches / 3).
Numbers must match those servers, so the rules below follow them exactly, quirks included (see ``_PERIOD`` and
``OFFICIAL_PERIOD_LIMIT``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from eval.common import EvalInputError

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# The official table: apostrophe-less spellings mapped back to their contraction. Keys with capitals can never
# match (text is lower-cased first) but are kept so the table stays the published one.
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# A comma between digits ("1,000") makes every punctuation mark vanish instead of becoming a space.
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit is dropped, so "3.5" survives and "cat." does not. The official pattern's
# "(?!<=\d)" is a typo for a look-behind and never fires; reproducing the pattern keeps "2." -> "2" as upstream.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code calls periodStrip.sub("", text, re.UNICODE): the flag lands in re.sub's count argument, so at
# most int(re.UNICODE) = 32 periods go (GT-Vision-Lab/VQA vqaEval.py; MMF's and LLaVA's m4c evaluator likewise).
# "yes" followed by 40 periods keeps 8 of them and matches no human answer.
OFFICIAL_PERIOD_LIMIT = 32

HUMAN_ANSWERS = 10


def human_answers(answers: Any, where: str) -> list[str]:
    """The 10 human answers of one question; anything else is an annotation error (the 10-choose-9 rule needs 10)."""
    if not isinstance(answers, list) or len(answers) != HUMAN_ANSWERS:
        found = f"{len(answers)} answers" if isinstance(answers, list) else type(answers).__name__
        raise EvalInputError(f"{where}: expected {HUMAN_ANSWERS} human answers, found {found}")
    if not all(isinstance(answer, str) for answer in answers):
        raise EvalInputError(f"{where}: human answers must be strings, found {answers!r}")
    return answers


def process_punctuation(text: str) -> str:
    """Punctuation next to a space (or any, in a text with a digit comma) is deleted; elsewhere it splits words."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor: the form in which predictions are submitted and compared."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(1, matches in the subset / 3)."""
    if not human_answers:
        raise ValueError("no human answers to score against")
    total = 0.0
    matches = sum(answer == prediction for answer in human_answers)
    for answer in human_answers:
        others = matches - (answer == prediction)
        total += min(1.0, others / 3.0)
    return total / len(human_answers)


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """m4c/TextVQA rule: prediction and every human answer go through the full EvalAI processor."""
    return leave_one_out_accuracy(normalize_answer(prediction), [normalize_answer(a) for a in human_answers])


def vqav2_accuracy(submitted: str, human_answers: Sequence[str]) -> float:
    """The official VQA evaluation of a submitted (already normalised) answer.

    Like the official script, punctuation and digit/article processing are applied only when the humans disagree;
    a unanimous answer is compared after whitespace clean-up alone.
    """

    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    answers = [clean(a) for a in human_answers]
    submitted = clean(submitted)
    if len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        submitted = process_digit_article(process_punctuation(submitted))
    return leave_one_out_accuracy(submitted, answers)
