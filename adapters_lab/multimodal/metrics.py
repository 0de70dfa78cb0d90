"""Scores of image-text answers: multiple choice by option letter (ScienceQA, IconQA choose-txt),
the standard VQA accuracy with its answer normalisation (VQAv2, OKVQA, VizWiz), exact match
(OCRVQA, IconQA fill-in-the-blank). Captioning (Flickr30k) needs a maintained captioning metric
library (pycocoevalcap), which is not a dependency here: it is refused as not supported yet.

The letter rule is LLaVA's ScienceQA scorer's: the whole answer if it is an option letter, else a
leading "X. ", else "The answer is X."; anything else is a failed parse (wrong). The VQA rule is the
VQA challenge's: the answer normalised (punctuation, number words to digits, articles and
contractions), then min(1, matching humans / 3) averaged over the ten leave-one-out subsets.
"""

from __future__ import annotations

import re

KINDS = ("letter", "vqa", "exact")
UNSUPPORTED = {"caption": "captioning (CIDEr, BLEU) is not supported yet: it needs pycocoevalcap, not installed here"}
LETTERS = "ABCDE"
ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's",
    "somethings": "something's", "thats": "that's", "thered": "there'd", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def parse_letter(text: str, options: str = LETTERS) -> str | None:
    """The option letter an answer states (LLaVA's ScienceQA rule), or None."""
    text = text.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if found and found[0] in options else None


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def normalize_vqa(answer: str) -> str:
    """The VQA challenge's answer processing: punctuation, then digits, articles and contractions."""
    text = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip().lower())
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, humans who gave it / 3), averaged over the leave-one-out subsets of the human answers."""
    if not answers:
        return 0.0
    predicted = normalize_vqa(prediction)
    gold = [normalize_vqa(a) for a in answers]
    scores = []
    for left_out in range(len(gold)):
        matches = sum(1 for j, g in enumerate(gold) if j != left_out and g == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def normalize_exact(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def score_answer(kind: str, output: str, record: dict) -> tuple[object, float]:
    """(prediction, score in [0, 1]) of one generated answer against a record's label."""
    if kind in UNSUPPORTED:
        raise ValueError(UNSUPPORTED[kind])
    if kind == "letter":
        prediction = parse_letter(output)
        return prediction, float(prediction is not None and prediction == record["answer"].strip())
    if kind == "vqa":
        answers = record.get("answers") or [record["answer"]]
        return normalize_vqa(output), vqa_accuracy(output, [str(a) for a in answers])
    if kind == "exact":
        prediction = normalize_exact(output)
        return prediction, float(prediction == normalize_exact(record["answer"]))
    raise ValueError(f"unknown answer kind {kind!r} (known: {KINDS})")
