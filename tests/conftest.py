import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["POTSTILL_QUIET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
TEACHER = QUICKSTART / "teacher"


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


def tiny_overrides(out: Path, n_prompts: int = 64, n_eval: int = 48) -> list[str]:
    """The quickstart recipe cut down to seconds: few prompts, one short epoch."""
    return [f"output_dir={out}", f"prompts.limit={n_prompts}", f"eval.limit={n_eval}", "train.epochs=1",
            "train.batch_size=16", "train.warmup_steps=0", "generation.batch_size=64", "train.log_every=1"]


def plan(ledger, teacher_key: str, prompts: list, params: dict, samples_per_prompt: int = 1, shard=None) -> list:
    """Record the requests for ``prompts`` (idempotent) and return those not yet done, as generate does."""
    from potstill.ledger import requests_for

    return ledger.add_requests(teacher_key, requests_for(teacher_key, prompts, params, samples_per_prompt, shard),
                               params)


def done_hashes(ledger) -> set[str]:
    return {r[0] for r in ledger.db.execute("SELECT request_hash FROM completions")}
