"""Write the quickstart prompt sets from the task generator (deterministic; already committed).

    python examples/quickstart/make_prompts.py

heldout.jsonl: 1,200 prompts for evaluation, never seen by the teacher in training.
train.jsonl:   8,000 prompts for the teacher to answer (distillation data), disjoint from heldout.
Each line: {"id", "prompt", "skill", "answer"}; for shuffle, "answer" is one of many valid ones.
"""

import json
from pathlib import Path

from potstill import skillmix

HERE = Path(__file__).resolve().parent


def write(path: Path, examples: list[dict], prefix: str) -> None:
    with path.open("w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"id": f"{prefix}-{i:05d}", **ex}) + "\n")


if __name__ == "__main__":
    (HERE / "prompts").mkdir(exist_ok=True)
    heldout = skillmix.generate(1200, seed=1234)
    train = skillmix.generate(8000, seed=5678, exclude={ex["prompt"] for ex in heldout})
    write(HERE / "prompts" / "heldout.jsonl", heldout, "heldout")
    write(HERE / "prompts" / "train.jsonl", train, "train")
