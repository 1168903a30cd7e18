"""How a causal LM turns its last hidden state into logits, for losses that build logits themselves.

The chunked loss (``train.chunk_size > 0``) never asks the model for its (N, V) logits: it builds
them a chunk at a time from the hidden states. Many heads are more than ``h @ W.T``:

    logits = softcap(scale * (h @ W.T + b)),    softcap(x) = c * tanh(x / c)

- a bias b: Phi, GPT-J, CodeGen;
- a scale: Cohere (``logit_scale``), Granite and MiniCPM3 (divide by ``logits_scaling``),
  HyperCLOVA X (multiply by it), Falcon-H1 (``lm_head_multiplier``), Muse (``output_multiplier``);
- a soft-cap c: Gemma 2/3, nanochat, VaultGemma (``final_logit_softcapping``).

Config names do not say the direction (``logits_scaling`` divides in Granite and multiplies in
HyperCLOVA X), and new architectures add their own, so ``output_head`` does not trust names alone:
it builds the candidate heads the config allows and keeps the one that reproduces the model's own
logits on a probe sequence. A head no candidate reproduces is refused with one clear error.
"""

from __future__ import annotations

import itertools

import torch

from potstill.errors import PotstillError
from potstill.losses.chunked import Head

# config fields that multiply (m) or divide (d) the logits in some architecture; a candidate is
# tried in both directions, and the probe decides
_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_SOFTCAPS = ("final_logit_softcapping",)
PROBE_LEN = 16


def _fields(config, names, *, skip_one: bool) -> list[float]:
    """Positive, finite values of ``names`` in the config or its text config. A scale of 1 is the
    plain head already tried (``skip_one``); a soft-cap of 1 is a real cap (tanh of the logits)."""
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    values = []
    for c, name in itertools.product(configs, names):
        v = getattr(c, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") and not (skip_one and v == 1):
            values.append(float(v))
    return sorted(set(values))


def _tolerance(logits: torch.Tensor, half: bool = False) -> float:
    """What a re-computed head may differ by: float32 rounding, or half precision's much coarser one
    (half-precision logits, or ``half``: computed under bf16/fp16 autocast and handed back as float32,
    as accelerate's mixed precision does)."""
    rel = 1e-4 if logits.dtype in (torch.float32, torch.float64) and not half else 2e-2
    return rel * max(1.0, logits.abs().max().item())


@torch.no_grad()
def output_head(model, what: str = "student", half: bool = False) -> Head:
    """The model's output head as a ``Head``, checked against ``model(...).logits`` on a probe.

    ``model`` is a Hugging Face causal LM (or a wrapper with ``.module`` or a PEFT model). Raises
    PotstillError when no candidate reproduces the model's logits (train.chunk_size=0 then works).
    """
    inner = getattr(model, "module", model)
    linear = inner.get_output_embeddings()
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    arch = type(inner).__name__
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PotstillError(f"train.chunk_size: the {what} ({arch}) has no linear output head potstill can read; "
                            f"set train.chunk_size=0")
    config = inner.config
    scales = [1.0] + [s for v in _fields(config, _SCALES, skip_one=True) for s in (v, 1.0 / v)]
    caps = [None] + _fields(config, _SOFTCAPS, skip_one=False)

    vocab = weight.shape[0]
    ids = torch.randint(0, vocab, (1, PROBE_LEN), generator=torch.Generator().manual_seed(0)).to(weight.device)
    was_training = inner.training
    inner.eval()  # no dropout in the probe
    try:
        out = inner(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    finally:
        inner.train(was_training)
    weight, bias = _full(linear, what)  # under FSDP2 the full head exists only now, after a forward
    hidden, logits = out.hidden_states[-1][0].float(), out.logits[0].float()  # (L, H), (L, V)
    tol = _tolerance(out.logits, half)
    best, best_err = None, float("inf")
    for scale, cap in itertools.product(scales, caps):
        head = Head(weight, bias, scale, cap)
        err = (head.logits(hidden, dtype=torch.float32) - logits).abs().max().item()
        if err < best_err:
            best, best_err = head, err
    if best_err > tol:
        raise PotstillError(
            f"train.chunk_size: the chunked loss cannot reproduce the {what}'s logits ({arch}: max difference "
            f"{best_err:.3g} with its lm_head{', bias' if bias is not None else ''}, scales {scales[1:] or 'none'}, "
            f"soft-caps {caps[1:] or 'none'}); set train.chunk_size=0 to train from the model's own logits")
    return best


def _full(linear, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias as the model holds them now, refused while sharded.

    Under FSDP2 (``fully_shard``) a parameter is a DTensor shard between forwards. The output head
    belongs to the root module (only decoder layers are sharded apart), and FSDP2 leaves the root's
    parameters gathered from its forward until its backward (it never reshards the root after
    forward): read right after the model's forward, the weight is the full (V, H) tensor FSDP2
    already gathered, at no extra communication, and the gradient the chunked loss gives it is
    reduce-scattered by FSDP2 with every other gradient. A gather of our own (``full_tensor()``)
    would instead cost one more all-gather and leave each process's head gradient unreduced."""
    from torch.distributed.tensor import DTensor

    weight, bias = linear.weight, getattr(linear, "bias", None)
    if isinstance(weight, DTensor) or isinstance(bias, DTensor):
        raise PotstillError(f"train.chunk_size: the {what}'s output head is sharded (FSDP) where the chunked loss reads "
                            f"it; set train.chunk_size=0")
    return weight, bias


def current(head: Head, model, what: str = "student") -> Head:
    """``head`` with the weight and bias ``model`` holds now (call after its forward): the same
    tensors on one process or under DDP, the gathered ones under FSDP2 (``_full``)."""
    weight, bias = _full(getattr(model, "module", model).get_output_embeddings(), what)
    return Head(weight, bias, head.scale, head.softcap)


def model_heads(student, teacher=None, half: bool = False) -> dict[str, Head]:
    """The checked heads of the student and, when it runs in the loop, the teacher; ``half``: the
    student's forward runs under bf16/fp16 mixed precision (its logits carry half precision's rounding)."""
    return {"student": output_head(student, half=half),
            **({"teacher": output_head(teacher, "teacher")} if teacher else {})}
