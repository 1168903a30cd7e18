"""Peak memory of reading a ledger's training rows: ``Ledger.examples`` then ``build_examples``,
as `potstill train` does, on a synthetic ledger of N completions of T tokens with top-k.

    python bench/ledger_memory.py [--rows 4000] [--tokens 256] [--k 20] [--dir /tmp/ledger-memory]

Each measurement runs in a fresh process (peak RSS from ``resource.getrusage``, minus the RSS
after imports), so the figures are the reading alone. The ledger is built once and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TEACHER = ROOT / "examples" / "quickstart" / "teacher"


def build(path: Path, rows: int, tokens: int, k: int) -> None:
    from potstill.ledger import Ledger, requests_for
    from potstill.prompts import Prompt
    from potstill.records import Completion

    rng = np.random.default_rng(0)
    with Ledger(path) as ledger:
        key = ledger.register_teacher({"id": "synthetic", "backend": "local"})
        prompts = [Prompt((("user", f"sort {i}"),), {"id": str(i)}) for i in range(rows)]
        planned = requests_for(key, prompts, {"seed": 0}, 1)
        todo = ledger.add_requests(key, planned, {"seed": 0})
        session = ledger.start_session(None)
        for start in range(0, len(todo), 500):
            ledger.record(session, [Completion(r.request_hash, "x", rng.integers(3, 41, tokens).astype(np.int32),
                                               rng.integers(0, 41, (tokens, k)).astype(np.int32),
                                               -np.sort(rng.random((tokens, k)).astype(np.float32), 1) * 5,
                                               "length", 4, 0, 0.0) for r in todo[start:start + 500]])


def measure(path: Path) -> None:
    from potstill.hf import load_tokenizer_dir
    from potstill.ledger import Ledger
    from potstill.train.examples import build_examples

    tok = load_tokenizer_dir(TEACHER)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Ledger(path) as ledger:
        examples = list(ledger.examples())
    data = build_examples(examples, tok, same_tokenizer=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": len(data), "peak_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ledger-memory"))
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args.measure)
    path = args.dir / f"ledger-{args.rows}x{args.tokens}x{args.k}.sqlite"
    if not path.is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        build(path, args.rows, args.tokens, args.k)
    stored = args.rows * args.tokens * (4 + args.k * (4 + 2))
    out = json.loads(subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True,
                                    capture_output=True, text=True).stdout)
    print(f"{out['rows']:,} rows x {args.tokens} tokens x top-{args.k}: stored arrays {stored / 2**20:.0f} MiB, "
          f"peak while reading {out['peak_mib']:.0f} MiB ({out['peak_mib'] * 2**20 / stored:.2f}x)")


if __name__ == "__main__":
    main()
