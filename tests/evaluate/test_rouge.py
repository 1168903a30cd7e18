"""eval's ROUGE-L is the published one: Google's ``rouge_score`` (the implementation papers report),
not a look-alike that splits on whitespace and keeps case and punctuation."""

import pytest
from rouge_score.rouge_scorer import RougeScorer

from potstill.evaluate.run import rouge_l

PAIRS = [  # (candidate, reference)
    ("Paris.", "paris"),  # case and punctuation are not tokens: 1.0 (a whitespace split said 0)
    ("", ""),  # no tokens on either side: 0.0 (a whitespace split said 1)
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("a b c d", "a c d e"),
    ("The answer is 42.", "42"),
    ("x", "y"),
    ("", "something"),
    ("It's 3:45 p.m., I think", "3 45 pm"),
    ("naïve café", "naive cafe"),  # non-ASCII letters are dropped by its tokenizer
    ("one two three two one", "one two one"),
]


@pytest.mark.parametrize("candidate,reference", PAIRS)
def test_rouge_l_is_rouge_score(candidate, reference):
    want = RougeScorer(["rougeL"], use_stemmer=False).score(reference, candidate)["rougeL"].fmeasure
    assert rouge_l(candidate, reference) == want


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    assert rouge_l("Paris.", "paris") == 1.0 and rouge_l("", "") == 0.0
    # LCS("the answer is 42", "42") = 1: precision 1/4, recall 1/1
    assert rouge_l("The answer is 42.", "42") == pytest.approx(2 * 0.25 * 1 / 1.25)
    # LCS("one two three two one", "one two one") = 3: precision 3/5, recall 1
    assert rouge_l("one two three two one", "one two one") == pytest.approx(2 * 0.6 / 1.6)
