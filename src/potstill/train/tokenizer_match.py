"""Can this student learn from this teacher's logits? Tokenizer compatibility, checked before training
and by ``potstill doctor TEACHER STUDENT``.

- identical: same token -> id map, same special tokens, same number of logit rows.
- padded: the same tokenizer, but one model has extra (padding) rows in its embedding / head,
  e.g. 151,936 vs 152,064 in the Qwen2.5 family. Logit KD runs on the shared ids only.
- different: the maps disagree, so token i of the teacher is not token i of the student. Logit KD
  is refused; sequence-level KD (train.objective=sft on the teacher's text) still works.
A different chat template is reported: the student would be trained on prompts it will not see
in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from potstill.errors import PotstillError


@dataclass
class Compat:
    kind: str  # identical | padded | different
    shared_vocab: int  # logit rows both models have, and both read the same way
    same_template: bool
    notes: list[str] = field(default_factory=list)

    @property
    def same_ids(self) -> bool:
        return self.kind != "different"


def compare(teacher_tok, teacher_rows: int, student_tok, student_rows: int) -> Compat:
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    same_map = t_vocab == s_vocab and teacher_tok.all_special_tokens == student_tok.all_special_tokens
    same_template = teacher_tok.chat_template == student_tok.chat_template
    notes = []
    if not same_map:
        moved = sum(1 for tok, i in t_vocab.items() if s_vocab.get(tok) != i)
        notes.append(f"{moved} of the teacher's {len(t_vocab)} tokens have another id (or none) in the student")
        kind, shared = "different", 0
    elif teacher_rows == student_rows:
        kind, shared = "identical", teacher_rows
    else:
        kind, shared = "padded", min(teacher_rows, student_rows)
        notes.append(f"logit rows differ ({teacher_rows:,} vs {student_rows:,}) over a {len(t_vocab):,}-token "
                     f"vocabulary: KD uses the {shared:,} shared rows")
    if not same_template:
        notes.append("chat templates differ: the student is trained with its own template")
    return Compat(kind, shared, same_template, notes)


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


def check_tokenizers(teacher_path: str | Path | None, student_tok, student_rows: int, *, need_logits: bool) -> Compat:
    """Compare the teacher at ``teacher_path`` with the student; refuse logit KD across tokenizers.
    No path: an HTTP teacher whose tokenizer is unknown, so its text is all a student can learn from."""
    from potstill.teachers.local import load_tokenizer_dir

    if teacher_path is None:
        if need_logits:
            raise PotstillError("logit KD needs the teacher's token ids, and this HTTP teacher has no local tokenizer: "
                                "set teacher.tokenizer and teacher.token_ids (vLLM, potstill serve), or use "
                                "sequence-level KD: train.objective=sft")
        return Compat("different", 0, False, ["the teacher's tokenizer is unknown (HTTP teacher without "
                                              "teacher.tokenizer): the student learns from its text"])

    teacher_tok = load_tokenizer_dir(teacher_path, "teacher tokenizer")
    try:
        teacher_rows = _rows(teacher_path, teacher_tok)
    except (OSError, ValueError) as e:
        raise PotstillError(f"teacher {teacher_path} could not be read: {str(e).splitlines()[0]}") from None
    compat = compare(teacher_tok, teacher_rows, student_tok, student_rows)
    if need_logits and compat.kind == "different":
        raise PotstillError("logit KD needs the student to share the teacher's tokenizer, and it does not ("
                            + compat.notes[0] + "); use sequence-level KD instead: train.objective=sft")
    return compat


def doctor(teacher_path: str | Path, student_path: str | Path) -> list[str]:
    """A human-readable report for ``potstill doctor``."""
    from potstill.teachers.local import load_tokenizer_dir

    lines = []
    student_tok = load_tokenizer_dir(student_path, "student tokenizer")
    try:
        compat = check_tokenizers(teacher_path, student_tok, _rows(student_path), need_logits=False)
    except (OSError, ValueError) as e:
        raise PotstillError(f"student {student_path} could not be read: {str(e).splitlines()[0]}") from None
    verdict = {"identical": "logit KD: yes (identical tokenizers)",
               "padded": "logit KD: yes, on the shared vocabulary rows",
               "different": "logit KD: no; sequence-level KD (train.objective=sft) only"}[compat.kind]
    lines.append(f"tokenizers: {compat.kind}")
    lines += [f"  - {n}" for n in compat.notes]
    lines.append(verdict)
    lines.append(f"chat template: {'same' if compat.same_template else 'different'}")
    return lines
