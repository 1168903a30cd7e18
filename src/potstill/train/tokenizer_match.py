"""Can this student learn from this teacher's logits? Tokenizer compatibility, checked before training
and by ``potstill doctor TEACHER STUDENT``.

- identical: same token -> id map, same special tokens, same ids for every sample text, same
  number of logit rows.
- padded: the same tokenizer, but one model has extra (padding) rows in its embedding / head,
  e.g. 151,936 vs 152,064 in the Qwen2.5 family. Logit KD runs on the shared ids only.
- different: the maps or the special tokens disagree, so token i of the teacher is not token i of
  the student; or the maps agree but text is split differently (a tokenizer class such as
  Qwen2Tokenizer builds its own pre-tokenizer and normalizer and ignores tokenizer.json's), so the
  teacher's ids are not what the student's tokenizer makes of the same text. Logit KD is refused;
  sequence-level KD (train.objective=sft on the teacher's text) still works.
The sample texts are encoded by both loaded tokenizers as training encodes them: built-in probes
(digits, whitespace, accents, contractions, ...) and up to SAMPLE of the recipe's prompts and
answers. A different chat template is reported: the student would be trained on prompts it will not
see in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from potstill.errors import PotstillError

# Texts that tokenizers with the same vocabulary are known to split differently: digit runs (one
# digit a token in Qwen2 / Llama-3 style, runs in GPT-2 style), whitespace and newline runs,
# contractions, composed and decomposed accents (an NFC normalizer or none), CJK, emoji, code.
PROBES = ("12345 + 678 = 13023, 3.14159", "it's, we'RE, they'll, I'D", "two  spaces,   three\n\n\tand a tab  ",
          "caf\u00e9 or cafe\u0301, na\u00efve \u00c5ngstr\u00f6m", "\u6771\u4eac\u30bf\u30ef\u30fc 2024\u5e74",
          "\U0001f642\U0001f44d\U0001f3fd!", "def f(x):\n    return x**2  # square", "HTTPServerError_v2")
SAMPLE = 200  # prompts, and as many answers, of a recipe encoded by both tokenizers: milliseconds


@dataclass
class Compat:
    kind: str  # identical | padded | different
    shared_vocab: int  # logit rows both models have, and both read the same way
    same_template: bool
    notes: list[str] = field(default_factory=list)
    sampled: int = 0  # sample texts encoded by both tokenizers (0: not compared, the maps differ)
    split_differently: int = 0  # of those, the ones encoded to other ids

    @property
    def same_ids(self) -> bool:
        return self.kind != "different"


def compare(teacher_tok, teacher_rows: int, student_tok, student_rows: int, samples=()) -> Compat:
    """``samples``: texts (an answer) and lists of chat messages (a prompt), encoded by both tokenizers."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    same_template = teacher_tok.chat_template == student_tok.chat_template
    notes = [*_vocabulary_differences(t_vocab, s_vocab), *_special_differences(teacher_tok, student_tok)]
    sampled = split = 0
    if not notes:  # the same map: does each split text the same way?
        sampled, split, note = _encoding_differences(teacher_tok, student_tok, samples, same_template)
        notes += [note] if split else []
    if notes:
        kind, shared = "different", 0
    elif teacher_rows == student_rows:
        kind, shared = "identical", teacher_rows
    else:
        kind, shared = "padded", min(teacher_rows, student_rows)
        notes.append(f"logit rows differ ({teacher_rows:,} vs {student_rows:,}) over a {len(t_vocab):,}-token "
                     f"vocabulary: KD uses the {shared:,} shared rows")
    if not same_template:
        notes.append("chat templates differ: the student is trained with its own template")
    return Compat(kind, shared, same_template, notes, sampled, split)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _vocabulary_differences(t_vocab: dict, s_vocab: dict) -> list[str]:
    moved = [f"{tok!r} {i} -> {s_vocab.get(tok, 'none')}" for tok, i in t_vocab.items() if s_vocab.get(tok) != i]
    if moved:
        return [f"{len(moved)} of the teacher's {len(t_vocab)} tokens have another id (or none) in the student, "
                f"e.g. {_few(moved)}"]
    extra = [repr(tok) for tok in s_vocab if tok not in t_vocab]
    return [f"the student has {len(extra)} tokens the teacher has not, e.g. {_few(extra)}"] if extra else []


def _special_differences(teacher_tok, student_tok) -> list[str]:
    """The special tokens that differ, named: the end-of-sequence token (the teacher's completions end
    with its id; the student stops at its own), and those special in one tokenizer only. Other roles
    (bos, pad, unk) matter where they change ids, and the sample texts show that."""
    t_eos, s_eos = teacher_tok.eos_token, student_tok.eos_token
    parts = [f"eos_token {t_eos!r} vs {s_eos!r}"] if t_eos != s_eos else []
    t_all, s_all = set(teacher_tok.all_special_tokens), set(student_tok.all_special_tokens)
    only_t = [repr(x) for x in sorted(t_all - s_all - {t_eos, s_eos})]
    only_s = [repr(x) for x in sorted(s_all - t_all - {t_eos, s_eos})]
    parts += [f"only the teacher's: {_few(only_t)}"] if only_t else []
    parts += [f"only the student's: {_few(only_s)}"] if only_s else []
    return [f"special tokens differ (teacher vs student): {'; '.join(parts)}"] if parts else []


def encode(tokenizer, sample, *, template: bool) -> list[int]:
    """A sample's ids as training makes them: an answer's text without special tokens; a prompt
    through the chat template, or as its text where the two templates differ (reported apart)."""
    from potstill.hf import prompt_ids

    if isinstance(sample, str):
        return tokenizer(sample, add_special_tokens=False)["input_ids"]
    if template:
        return prompt_ids(tokenizer, sample)
    return tokenizer("\n".join(m["content"] for m in sample), add_special_tokens=False)["input_ids"]


def _encoding_differences(teacher_tok, student_tok, samples, same_template: bool) -> tuple[int, int, str]:
    """(texts encoded, texts encoded to other ids, a note naming the first of them)."""
    samples = [*PROBES, *samples]
    differ = []
    for sample in samples:
        t_ids = encode(teacher_tok, sample, template=same_template)
        s_ids = encode(student_tok, sample, template=same_template)
        if t_ids != s_ids:
            differ.append((sample, t_ids, s_ids))
    if not differ:
        return len(samples), 0, ""
    sample, t_ids, s_ids = differ[0]
    text = sample if isinstance(sample, str) else "\n".join(m["content"] for m in sample)
    at = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids)))

    def pieces(tok, ids):  # the tokens from the first difference on, as text
        return [tok.decode([i]) for i in ids[at:at + 4]]

    note = (f"the tokenizers split text differently: {len(differ)} of {len(samples)} sample texts encode to other "
            f"ids, e.g. {text[:60]!r}: teacher {pieces(teacher_tok, t_ids)}, student {pieces(student_tok, s_ids)}")
    t_class, s_class = type(teacher_tok).__name__, type(student_tok).__name__
    if t_class != s_class:
        note += (f" (the teacher's folder loads as {t_class}, the student's as {s_class}: a tokenizer class can build "
                 f"its own splitting rules and ignore tokenizer.json's; give both tokenizer_config.json files the "
                 f"teacher's tokenizer_class)")
    return len(samples), len(differ), note


def _rows(path: str | Path, tokenizer=None) -> int:
    """Logit rows of the model at ``path``; a tokenizer-only folder (an HTTP teacher's) has as many
    rows as tokens."""
    from transformers import AutoConfig

    if tokenizer is not None and not (Path(path) / "config.json").is_file():
        return len(tokenizer)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    return getattr(config.get_text_config(), "vocab_size")


def logit_rows(student, tokenizer) -> int:
    """Logit rows of the student a recipe's ``student`` section describes, without building it."""
    if student.path is not None:
        try:
            return _rows(student.path)
        except (OSError, ValueError) as e:
            raise PotstillError(f"student.path {student.path} could not be read: {str(e).splitlines()[0]}") from None
    return student.config.get("vocab_size", len(tokenizer))  # as train.load_student sizes a fresh one


def recipe_samples(recipe) -> list:
    """Up to SAMPLE of the recipe's prompts and of its held-out reference answers: what is checked
    before anything is generated."""
    from potstill.prompts import load_prompts

    samples = []
    if recipe.prompts is not None:
        samples += [p.chat for p in load_prompts(recipe.prompts.path, min(recipe.prompts.limit or SAMPLE, SAMPLE))]
    held_out = load_prompts(recipe.eval.prompts, SAMPLE)
    return samples + [p.meta["answer"] for p in held_out if isinstance(p.meta.get("answer"), str)]


def ledger_samples(examples: list) -> list:
    """Up to SAMPLE ledger examples, spread over them: each one's prompt and completion text."""
    picked = examples[::max(1, len(examples) // SAMPLE)][:SAMPLE]
    return [ex.messages for ex in picked] + [ex.text for ex in picked]


def check_tokenizers(teacher_path: str | Path | None, student_tok, student_rows: int, *, samples=()) -> Compat:
    """Compare the teacher at ``teacher_path`` with the student (``samples`` as in ``compare``, with
    the PROBES). No path: an HTTP teacher whose tokenizer is unknown, so its text, and its top-k as
    bytes where it gave them, are all a student can learn from."""
    from potstill.hf import load_tokenizer_dir

    if teacher_path is None:
        return Compat("different", 0, False, ["the teacher's tokenizer is unknown (HTTP teacher without "
                                              "teacher.tokenizer): the student learns from its text, and from "
                                              "its top-k as bytes where the endpoint gave them"])

    teacher_tok = load_tokenizer_dir(teacher_path, "teacher tokenizer")
    try:
        teacher_rows = _rows(teacher_path, teacher_tok)
    except (OSError, ValueError) as e:
        raise PotstillError(f"teacher {teacher_path} could not be read: {str(e).splitlines()[0]}") from None
    return compare(teacher_tok, teacher_rows, student_tok, student_rows, samples)


def doctor(teacher_path: str | Path, student_path: str | Path, prompts: str | Path | None = None) -> list[str]:
    """A human-readable report for ``potstill doctor``; ``prompts``: a prompt file (as prompts.path)
    whose first SAMPLE prompts, and their "answer"s, are encoded by both tokenizers besides the PROBES."""
    from potstill.hf import load_tokenizer_dir
    from potstill.prompts import load_prompts

    samples = []
    if prompts is not None:
        for p in load_prompts(prompts, SAMPLE):
            samples += [p.chat] + ([p.meta["answer"]] if isinstance(p.meta.get("answer"), str) else [])
    lines = []
    student_tok = load_tokenizer_dir(student_path, "student tokenizer")
    try:
        compat = check_tokenizers(teacher_path, student_tok, _rows(student_path), samples=samples)
    except (OSError, ValueError) as e:
        raise PotstillError(f"student {student_path} could not be read: {str(e).splitlines()[0]}") from None
    verdict = {"identical": "logit KD: yes (identical tokenizers)",
               "padded": "logit KD: yes, on the shared vocabulary rows"}.get(compat.kind)
    if verdict is None:
        teacher_tok = load_tokenizer_dir(teacher_path, "teacher tokenizer")
        exact, total, skipped = aligned_share(teacher_tok, student_tok, samples)
        verdict = ("logit KD: across tokenizers (potstill.align maps the teacher's top-k onto the student's tokens: "
                   "from the ledger with teacher_signal cached; online and on_policy, the teacher re-reads the "
                   "student's text every step)"
                   + (f"\n  - {exact / total:.0%} of the student's tokens ({exact:,} of {total:,}, on "
                      f"{len(samples) + len(PROBES) - skipped} sample texts) are exactly one teacher token: their "
                      f"targets are the teacher's top-k as it is" if total else "")
                   + (f"\n  - {skipped} sample texts the tokenizers cannot spell byte for byte: such rows "
                      f"train on their text alone" if skipped else ""))
    lines.append(f"tokenizers: {compat.kind}")
    lines += [f"  - {n}" for n in compat.notes]
    if compat.sampled:
        lines.append(f"sample texts: {compat.sampled} encoded by both tokenizers, {compat.split_differently} to "
                     f"other ids")
    lines.append(verdict)
    lines.append(f"chat template: {'same' if compat.same_template else 'different'}")
    return lines


def aligned_share(teacher_tok, student_tok, samples=()) -> tuple[int, int, int]:
    """(student tokens that are exactly one teacher token, student tokens, texts skipped) over the
    PROBES and ``samples`` (texts, or chat messages whose contents are joined), both tokenizers
    spelling each text byte for byte (``align.encode_with_offsets``; a text either cannot is skipped)."""
    from potstill.align import encode_with_offsets, token_bytes

    t_pieces, s_pieces = token_bytes(teacher_tok), token_bytes(student_tok)
    exact = total = skipped = 0
    for sample in [*PROBES, *samples]:
        text = sample if isinstance(sample, str) else "\n".join(m["content"] for m in sample)
        try:
            _, t_spans = encode_with_offsets(teacher_tok, text, t_pieces)
            _, s_spans = encode_with_offsets(student_tok, text, s_pieces)
        except PotstillError:
            skipped += 1
            continue
        teacher_spans = {tuple(span) for span in t_spans}
        exact += sum(tuple(span) in teacher_spans for span in s_spans)
        total += len(s_spans)
    return exact, total, skipped
