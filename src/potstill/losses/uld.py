r"""Universal Logit Distillation across tokenizers: sorted probabilities compared, no shared vocabulary.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
LLMs" (arXiv:2402.12030), with the byte alignment and token merging of GOLD (TRL's GOLDTrainer,
"Unlocking On-Policy Distillation for Any Model Family", Patiño et al. 2025).

    ULD = (1 / G) * sum_g sum_i | sort(q_g)_i - sort(p_g)_i |

Student and teacher tokenize the same text; ``align.align_groups`` cuts it into G spans where both
tokenizations cut at the same byte (group g: student positions S_g, teacher positions T_g; groups
with an empty side are dropped). Each side's group distribution is the "observed" merge: the
distribution at the group's first position times the probabilities of the actual later tokens,

    q_g(v) = q_{s_0}(v) * prod_{s in S_g, s > s_0} max(q_s(x_s), 1e-8)      (p_g likewise, teacher)

so for v = x_{s_0} it is the probability of the group's actual tokens (chain rule when row s is
the distribution that predicts x_s), and for other v an approximation (the later factors are
conditioned on the actual first token). q = softmax(student_logits / student_temperature),
p = softmax(teacher_logits / teacher_temperature). sort is descending; the shorter vocabulary is
zero-padded to the longer one. Sorting makes the loss blind to which id holds which probability:
with uniform transport cost it is the closed form of the Wasserstein-1 distance the paper derives.
Each group's term is an L1 between two vectors of total mass at most 1, so in [0, 2]; no T^2
factor (the paper has none).

Shapes: student_logits (S, V_s), teacher_logits (T, V_t), the rows of the completion's tokens;
student_ids (S,), teacher_ids (T,) the tokens; s_offsets (S, 2), t_offsets (T, 2) their UTF-8 byte
spans in the same text (``align.encode_with_offsets``). Returns the 0-dim mean over groups (0, with a
gradient, when there are none). Differentiable in both logits (the teacher's are usually detached).

Exact: equals TRL 1.16's ``ULDLoss`` with use_extended_uld=True, uld_token_merge_strategy="observed",
uld_crossentropy_weight=0, uld_distillation_weight=1, uld_skip_student_eos=uld_skip_teacher_eos=False,
no hybrid loss, on one sequence whose completion rows are these (tests check 1e-5, and the
gradients). TRL's trainer passes the rows at the completion's positions unshifted (row i predicts
token i + 1); the numbers here are whatever rows the caller gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.align import align_groups

_EPS = 1e-8  # the floor of a later token's probability in a merged group (TRL's)


def observed_merge(probs: Tensor, groups: list[list[int]], ids: Tensor) -> Tensor:
    """(N, V) probabilities, G groups of positions, (N,) actual tokens -> (G, V): each group's first
    row times the probabilities of the group's later actual tokens."""
    first = torch.tensor([g[0] for g in groups], device=probs.device)
    later = [(gi, s) for gi, g in enumerate(groups) for s in g[1:]]
    if not later:
        return probs[first]
    group_of = torch.tensor([gi for gi, _ in later], device=probs.device)
    rows = torch.tensor([s for _, s in later], device=probs.device)
    chosen = probs[rows, ids[rows]].clamp_min(_EPS)  # (L,) the later tokens' own probabilities
    factor = probs.new_ones(len(groups)).scatter_reduce(0, group_of, chosen, "prod")  # (G,)
    return probs[first] * factor[:, None]


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor | Sequence[int],
             teacher_ids: Tensor | Sequence[int], s_offsets: Sequence[Sequence[int]],
             t_offsets: Sequence[Sequence[int]], student_temperature: float = 1.0,
             teacher_temperature: float = 1.0) -> Tensor:
    """The ULD term of one sequence (formula in the module's docstring): a 0-dim tensor."""
    s_groups, t_groups = align_groups([tuple(o) for o in s_offsets], [tuple(o) for o in t_offsets])
    pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
    if not pairs:
        return student_logits.sum() * 0.0
    q = F.softmax(student_logits / student_temperature, -1)  # (S, V_s)
    p = F.softmax(teacher_logits / teacher_temperature, -1)  # (T, V_t)
    q_g = observed_merge(q, [sg for sg, _ in pairs], torch.as_tensor(student_ids, device=q.device))  # (G, V_s)
    p_g = observed_merge(p, [tg for _, tg in pairs], torch.as_tensor(teacher_ids, device=p.device))  # (G, V_t)
    width = max(q_g.shape[-1], p_g.shape[-1])
    q_sorted = F.pad(q_g.sort(-1, descending=True).values, (0, width - q_g.shape[-1]))
    p_sorted = F.pad(p_g.sort(-1, descending=True).values, (0, width - p_g.shape[-1]))
    return (q_sorted - p_sorted).abs().sum() / len(pairs)
