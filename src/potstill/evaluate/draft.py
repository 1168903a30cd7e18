r"""The student as a speculative-decoding draft of its teacher: acceptance from the distributions,
and acceptance and speed measured with transformers' assisted generation.

**Acceptance from the distributions** (on the teacher's held-out answers, the pass that computes
KL and top-1; p the teacher's next-token distribution, q the student's, at each position of the
teacher's answer):

- at temperature T (the recipe's ``generation.temperature``, the one the teacher samples at),
  speculative sampling (Leviathan et al. 2023, arXiv 2211.17192, Chen et al. 2023) accepts a
  token the draft sampled from q_T with probability

      alpha_T = sum_v min(p_T(v), q_T(v)) = 1 - TVD(p_T, q_T),   p_T = softmax(logits_p / T)

- at greedy (transformers' assisted generation with ``do_sample=False``, vLLM at temperature 0)
  the draft proposes argmax q and the teacher keeps it iff it is argmax p:

      alpha_greedy = 1[argmax q = argmax p]   (the limit of alpha_T as T -> 0; top-1 agreement)

alpha is the mean over positions (the paper's alpha = E[beta]), also by category and by position in
the answer. With gamma draft tokens per verification step and the paper's i.i.d. approximation
(each draft token accepted independently with probability alpha), the expected number of tokens a
verification step yields (accepted draft tokens, plus the one the teacher adds) is

      E[tokens/step] = (1 - alpha^(gamma + 1)) / (1 - alpha),   gamma + 1 at alpha = 1

vLLM reports the same quantity as its mean acceptance length; accepted draft tokens are one fewer.
Real acceptances are not independent (an easy stretch is accepted whole), and an answer's end
cuts the last step short, so this is an estimate: the measured figure is beside it.

**Measured** (:func:`measure_assisted`): ``model.generate(assistant_model=student)``, greedy,
batch 1, gamma draft tokens a step (fixed, as vLLM's ``num_speculative_tokens``: the schedule
``constant`` and no confidence cut-off), on the first ``DRAFT_PROMPTS`` held-out prompts, against
the teacher alone on the same prompts. Every assisted output must equal the teacher's own greedy
output token for token (verification makes them equal; anything else is a bug, raised as an
error). Tokens per step = new tokens / the teacher's forward passes (one per verification step,
counted with a forward hook). The speed-up is the teacher's time over the assisted time, each after
an untimed warm-up the median of ``DRAFT_TIMINGS`` repeats (the teacher alone is timed once per
eval, for every student). A student with another
tokenizer is measured with universal assisted decoding (``tokenizer=``, ``assistant_tokenizer=``).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from potstill.errors import PotstillError

GAMMAS = range(1, 9)  # draft tokens per verification step in the expected-tokens table
GAMMA = 4  # draft tokens per step in the measured run (vLLM's num_speculative_tokens is usually 3-5)
DRAFT_PROMPTS = 6  # held-out prompts in the measured run (batch 1, a prompt at a time): within 10 % of eval
DRAFT_TIMINGS = 3  # timed repeats of each; the median is the figure
SINGLE_POSITIONS = 16  # positions 0..15 each their own bucket, then 16-31, 32-63, ... (doubling)


def acceptance(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               temperature: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per position: (greedy acceptance 1[argmax q = argmax p] as float, alpha_T = sum_v min(p_T, q_T)
    or None without a temperature). Logits (N, V), the same vocabulary; returns two (N,) tensors."""
    greedy = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float()
    if not temperature:
        return greedy, None
    p = (teacher_logits.float() / temperature).softmax(-1)  # (N, V)
    q = (student_logits.float() / temperature).softmax(-1)
    return greedy, torch.minimum(p, q).sum(-1)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): tokens per verification step with gamma draft tokens,
    each accepted independently with probability alpha (Leviathan et al. 2023, eq. 1)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def position_bucket(i: int) -> tuple[int, int]:
    """The positions (first, last) reported together with position ``i`` of an answer."""
    if i < SINGLE_POSITIONS:
        return i, i
    lo = 1 << (i.bit_length() - 1)
    return lo, 2 * lo - 1


class Acceptance:
    """Sums of per-position acceptance, overall, by category and by position bucket."""

    def __init__(self, temperature: float | None):
        self.temperature = temperature or None  # 0 (greedy sampling) has no alpha_T
        self.sums: dict[tuple, list[float]] = {}  # key -> [greedy sum, alpha_T sum, positions]
        self.seconds = 0.0  # time spent here: the cost the acceptance metrics add to eval

    def add(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, categories: list[str],
            positions: list[int]) -> None:
        """One batch: logits (N, V) at N answer positions, each position's category and index in its answer."""
        start = time.perf_counter()
        greedy, sampled = acceptance(teacher_logits, student_logits, self.temperature)
        greedy = greedy.tolist()
        sampled = sampled.tolist() if sampled is not None else [0.0] * len(greedy)
        for g, s, cat, pos in zip(greedy, sampled, categories, positions):
            for key in (("all",), ("category", cat), ("position", position_bucket(pos))):
                acc = self.sums.setdefault(key, [0.0, 0.0, 0])
                acc[0] += g
                acc[1] += s
                acc[2] += 1
        self.seconds += time.perf_counter() - start

    def _alphas(self, key) -> dict:
        g, s, n = self.sums.get(key, (0.0, 0.0, 0))
        if not n:
            return {"greedy": None, "sampled": None, "tokens": 0}
        return {"greedy": g / n, "sampled": s / n if self.temperature else None, "tokens": n}

    def summary(self) -> dict:
        """eval.json's ``draft`` figures from the distributions (alpha, expected tokens per step)."""
        overall = self._alphas(("all",))
        return {
            "temperature": self.temperature,
            "alpha": {"greedy": overall["greedy"], "sampled": overall["sampled"]},
            "expected_tokens_per_step": {
                mode: {str(g): expected_tokens_per_step(overall[mode], g) for g in GAMMAS}
                if overall[mode] is not None else None for mode in ("greedy", "sampled")},
            "by_category": {k[1]: self._alphas(k) for k in sorted(k for k in self.sums if k[0] == "category")},
            "by_position": [{"positions": list(k[1]), **self._alphas(k)}
                            for k in sorted(k for k in self.sums if k[0] == "position")],
            "seconds": self.seconds,
        }


@contextmanager
def counting_forwards(model):
    """A one-item list counting ``model``'s forward passes within the block."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def draft_config(model, gamma: int):
    """The assistant's generation settings for the block: exactly gamma draft tokens a step
    (transformers' default schedule changes the number, and its confidence cut-off stops early)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant",
                                               assistant_confidence_threshold=0.0)
    try:
        yield
    finally:
        model.generation_config = saved


def universal_gap(teacher, student) -> str | None:
    """Why this transformers cannot run ``student`` as a draft of ``teacher`` across tokenizers, or None."""
    try:
        from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers  # noqa: F401
    except ImportError:
        import transformers

        return f"transformers {transformers.__version__} has no universal assisted decoding (assistant_tokenizer=)"
    t_rows = teacher.model.get_output_embeddings().weight.shape[0]
    if t_rows == student.model.get_output_embeddings().weight.shape[0]:
        # transformers decides "same tokenizer" by vocabulary size and refuses assistant_tokenizer then
        return (f"the tokenizers differ but the vocabularies have the same size ({t_rows:,}), which transformers' "
                f"assisted generation takes for one tokenizer: its ids would be read as the teacher's")
    return None


def measure_assisted(teacher, student, prompts, max_new_tokens: int, *, gamma: int = GAMMA,
                     n_prompts: int = DRAFT_PROMPTS, repeats: int = DRAFT_TIMINGS, same_tokenizer: bool = True,
                     reference: dict | None = None) -> dict:
    """``student`` (a LocalModel) as the draft of ``teacher``: greedy assisted generation at batch 1
    on the first ``n_prompts`` prompts against the teacher alone. Raises PotstillError when an
    assisted output differs from the teacher's own greedy output. ``reference``, a dict kept across
    calls with the same teacher and prompts, holds the teacher-alone runs: timed once, not per student."""
    from potstill.hf import folder_defaults_off, prompt_ids, stated_config
    from potstill.records import greedy_params

    start = time.perf_counter()
    model, tok = teacher.model, teacher.tokenizer
    config = stated_config(greedy_params(max_new_tokens), tok, model.get_output_embeddings().weight.shape[0])
    rows = [torch.tensor([prompt_ids(tok, p.chat)], device=model.device) for p in prompts[:n_prompts]]
    # transformers takes two vocabulary sizes for two tokenizers: a student of the same tokenizer with
    # a padded vocabulary (more output rows) runs through universal assisted decoding too
    universal = not same_tokenizer or (model.get_output_embeddings().weight.shape[0]
                                       != student.model.get_output_embeddings().weight.shape[0])
    extra = {"tokenizer": tok, "assistant_tokenizer": student.tokenizer} if universal else {}

    @torch.no_grad()
    def run(ids, assisted: bool) -> list[int]:
        kwargs = {"assistant_model": student.model, **extra} if assisted else {}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def timed(assisted: bool) -> tuple[float, list[list[int]], int]:
        with counting_forwards(model) as calls:
            t0 = time.perf_counter()
            outs = [run(ids, assisted) for ids in rows]
            return time.perf_counter() - t0, outs, calls[0]

    reference = {} if reference is None else reference
    with folder_defaults_off(model), draft_config(student.model, gamma):
        if "alone" not in reference:
            run(rows[0], False)  # warm-up, untimed
            reference["alone"] = [timed(False) for _ in range(repeats)]
        run(rows[0], True)  # warm-up, untimed
        assisted = [timed(True) for _ in range(repeats)]
    alone = reference["alone"]
    expected = alone[0][1]
    for _, outs, _ in alone[1:] + assisted:
        check_identical(expected, outs, tok)
    tokens = sum(len(o) for o in expected)
    steps = assisted[0][2]
    t_alone, t_assisted = statistics.median(a[0] for a in alone), statistics.median(b[0] for b in assisted)
    return {
        "prompts": len(rows), "gamma": gamma, "batch_size": 1, "decoding": "greedy", "repeats": repeats,
        "universal": universal, "identical": True,  # checked above: a difference raised
        "new_tokens": tokens, "verification_steps": steps,
        "tokens_per_step": tokens / steps, "accepted_per_step": (tokens - steps) / steps,
        "expected_tokens_per_step": None,  # filled by the caller from alpha_greedy at this gamma
        "teacher_tokens_per_second": tokens / t_alone, "assisted_tokens_per_second": tokens / t_assisted,
        # median times; the range pairs the fastest and slowest runs of each
        "speedup": t_alone / t_assisted,
        "speedup_range": [min(a[0] for a in alone) / max(b[0] for b in assisted),
                          max(a[0] for a in alone) / min(b[0] for b in assisted)],
        "seconds": time.perf_counter() - start,
    }


def check_identical(reference: list[list[int]], outputs: list[list[int]], tokenizer) -> None:
    """Assisted greedy outputs equal the teacher's, token for token, or one error naming the first difference."""
    for i, (want, got) in enumerate(zip(reference, outputs)):
        if want != got:
            at = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise PotstillError(
                f"assisted generation differs from the teacher's greedy output on held-out prompt {i}, token {at}: "
                f"{tokenizer.decode(want[at:at + 8])!r} (teacher alone) vs {tokenizer.decode(got[at:at + 8])!r} "
                f"(with the draft); verification should make them equal: a bug in the generation stack, not a "
                f"property of the draft (report it with the versions in eval.json)")
