"""The quickstart task: a procedurally generated mix of small skills with checkable answers.

Each prompt is one line of lowercase text, e.g. ``add 127 45``; the answer is a short string
(``172``). Six skills, chosen so that a ~2M-parameter model learns them well and a model ten
times smaller finds most of them hard:

    add      add 127 45        -> 172        (1-3 digit operands)
    mul      mul 47 8          -> 376        (2-99 times 2-9)
    rev      rev abcde         -> edcba      (3-7 letters)
    sort     sort 5391         -> 1359       (4-7 digits)
    count    count b abcbdab   -> 2          (5-10 letters from "abcd")
    shuffle  shuffle abcd      -> any permutation of the letters (several valid answers)

``shuffle`` has many correct answers, so a teacher trained on random permutations spreads its
probability over them: its logits carry information that its sampled text alone does not,
which is what logit distillation can exploit.

``generate`` is deterministic in its seed; ``verify`` checks an answer whatever the skill.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

SKILLS = ("add", "mul", "rev", "sort", "count", "shuffle")
ALPHABET = string.ascii_lowercase + string.digits + " "  # every character a prompt or answer uses


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_example(skill: str, rng: random.Random) -> dict:
    """One example of ``skill``: {"prompt", "skill", "answer"} (for shuffle, one valid answer)."""
    if skill == "add":
        a, b = _number(rng, 3), _number(rng, 3)
        return {"prompt": f"add {a} {b}", "skill": skill, "answer": str(a + b)}
    if skill == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        return {"prompt": f"mul {a} {b}", "skill": skill, "answer": str(a * b)}
    if skill == "rev":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        return {"prompt": f"rev {word}", "skill": skill, "answer": word[::-1]}
    if skill == "sort":
        digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
        return {"prompt": f"sort {digits}", "skill": skill, "answer": "".join(sorted(digits))}
    if skill == "count":
        letter = rng.choice("abcd")
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(5, 10)))
        return {"prompt": f"count {letter} {text}", "skill": skill, "answer": str(text.count(letter))}
    if skill == "shuffle":
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
        answer = letters[:]
        rng.shuffle(answer)
        return {"prompt": f"shuffle {''.join(letters)}", "skill": skill, "answer": "".join(answer)}
    raise ValueError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")


def stream(seed: int, skills: tuple[str, ...] = SKILLS) -> Iterator[dict]:
    """An endless, seeded stream of examples, skills drawn uniformly."""
    rng = random.Random(seed)
    while True:
        yield make_example(rng.choice(skills), rng)


def generate(n: int, seed: int, skills: tuple[str, ...] = SKILLS, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` examples with distinct prompts, none of them in ``exclude``."""
    seen = set(exclude)
    out = []
    for example in stream(seed, skills):
        if len(out) == n:
            return out
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
    return out


def verify(prompt: str, answer: str) -> bool:
    """True when ``answer`` is a correct answer to ``prompt`` (any valid one, for shuffle)."""
    answer = answer.strip()
    parts = prompt.split(" ")
    skill = parts[0]
    try:
        if skill == "add":
            return answer == str(int(parts[1]) + int(parts[2]))
        if skill == "mul":
            return answer == str(int(parts[1]) * int(parts[2]))
        if skill == "rev":
            return answer == parts[1][::-1]
        if skill == "sort":
            return answer == "".join(sorted(parts[1]))
        if skill == "count":
            return answer == str(parts[2].count(parts[1]))
        if skill == "shuffle":
            return sorted(answer) == sorted(parts[1])
    except (IndexError, ValueError):
        return False
    return False


def verify_example(prompt: str, answer: str, reference: dict) -> bool:
    """The ``potstill.verifiers`` entry point: any valid answer counts."""
    return verify(prompt, answer)
