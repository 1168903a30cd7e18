"""Ledger -> tokenized training examples (labels -100 on the prompt) + sparse teacher targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.hf import prompt_ids
from potstill.ledger import Example


@dataclass
class TrainExample:
    input_ids: list[int]  # prompt + completion
    n_prompt: int  # the first n_prompt ids are the prompt (no loss)
    topk_ids: np.ndarray | None  # (n_completion, k): teacher's top-k for each completion token
    topk_logprobs: np.ndarray | None  # (n_completion, k)

    @property
    def n_completion(self) -> int:
        """Completion tokens: the ones the loss is over."""
        return len(self.input_ids) - self.n_prompt


def build_examples(examples: list[Example], tokenizer, *, same_tokenizer: bool) -> list[TrainExample]:
    """With the teacher's tokenizer, the teacher's own token ids and top-k are used; otherwise the
    completion text is re-tokenized (sequence-level KD only: no logits). An id the tokenizer does
    not have (a teacher's padding row, an imported file's) is refused, naming the ledger row."""
    out = []
    for ex in examples:
        p_ids = prompt_ids(tokenizer, ex.messages)
        if same_tokenizer and ex.token_ids is not None:
            check_ids(ex, len(tokenizer))
            c_ids = ex.token_ids.tolist()
            topk_ids, topk_lp = ex.topk_ids, ex.topk_logprobs
        else:
            c_ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
            if ex.finish_reason == "stop" and tokenizer.eos_token_id is not None:
                c_ids.append(tokenizer.eos_token_id)
            topk_ids = topk_lp = None
        if c_ids:
            out.append(TrainExample(p_ids + c_ids, len(p_ids), topk_ids, topk_lp))
    return out


def check_ids(ex: Example, n_tokens: int) -> None:
    for field, ids in (("token_ids", ex.token_ids), ("topk_ids", ex.topk_ids)):
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= n_tokens):
            bad = int(ids.max()) if ids.max() >= n_tokens else int(ids.min())
            raise PotstillError(f"ledger request {ex.request_hash}: {field} holds id {bad}, outside the tokenizer's "
                                f"{n_tokens} ids (0..{n_tokens - 1}): a teacher that sampled its vocabulary's padding rows "
                                f"(regenerate with this potstill) or an imported file of another tokenizer's ids")


def collate(batch: list[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Teacher targets sit at the position of the token they predict, the same
    as ``labels``, so both shift together in the loss.

    Returns input_ids, attention_mask, labels (B, L) and, when every example has them,
    topk_ids, topk_logprobs (B, L, k).
    """
    width = max(len(ex.input_ids) for ex in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    has_topk = all(ex.topk_ids is not None for ex in batch)
    if has_topk:
        k = batch[0].topk_ids.shape[1]
        topk_ids = torch.zeros((n, width, k), dtype=torch.long)
        topk_logprobs = torch.zeros((n, width, k), dtype=torch.float32)
    for i, ex in enumerate(batch):
        length = len(ex.input_ids)
        input_ids[i, :length] = torch.tensor(ex.input_ids)
        attention_mask[i, :length] = 1
        labels[i, ex.n_prompt:length] = torch.tensor(ex.input_ids[ex.n_prompt:])
        if has_topk:
            topk_ids[i, ex.n_prompt:length] = torch.from_numpy(np.asarray(ex.topk_ids, np.int64))
            topk_logprobs[i, ex.n_prompt:length] = torch.from_numpy(np.asarray(ex.topk_logprobs, np.float32))
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if has_topk:
        out["topk_ids"], out["topk_logprobs"] = topk_ids, topk_logprobs
    return out
