"""Peak memory of reading a ledger's training rows: ``Ledger.examples`` then ``build_examples``,
as `potstill train` does, on a synthetic ledger of N completions of T tokens with top-k.

    python bench/ledger_memory.py [--rows 4000] [--tokens 256] [--k 20] [--dir /tmp/ledger-memory]

Each measurement runs in a fresh process (peak RSS from ``resource.getrusage``, minus the RSS
after imports), so the figures are the reading alone. The ledger is built once and reused.

``--bytes``: the rows an endpoint that names tokens by their strings gives (OpenAI): token bytes,
top-k bytes and the chosen tokens' logprobs instead of ids, on English text. A byte-level BPE of
``--vocab`` tokens is trained on the first half of ``--text`` (default: this repository's
docs/*.md and README.md) and tokenizes the second half; each position's chosen token is the
text's, its k - 1 other alternatives are drawn by the held-out text's token frequencies (what a
model's top-k looks like: tokens as long as the text's), or uniformly over the vocabulary with
``--uniform`` (longer tokens: a pessimistic bound). Prints the stored bytes per token
(``Ledger.bytes_per_token``, the figure the ids' 124 at k = 20 is) and the reading's peak memory
(``Ledger.examples`` only: training reads no bytes yet).

    python bench/ledger_memory.py --bytes [--rows 500] [--vocab 8000] [--uniform] [--text FILE ...]

The figures in docs/architecture.md (161 and, ``--uniform``, 201 bytes per token at k = 20, 3.47
bytes a token of text): ``--rows 2000 --vocab 32000 --text /usr/share/vim/vim90/doc/*.txt
/usr/share/common-licenses/*`` (Debian's vim manual and licences, 10 MB of English).
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


def english_tokens(texts: list[Path], vocab: int) -> tuple[list[bytes], list[int], int]:
    """(the bytes of each token of the vocabulary, the held-out half's tokens, vocabulary size): a
    byte-level BPE trained on the first half of ``texts``, tokenizing the second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from potstill.align import token_bytes

    docs = [p.read_text(encoding="utf-8") for p in sorted(texts)]
    train, held = docs[::2], docs[1::2]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(train, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spelled = token_bytes(PreTrainedTokenizerFast(tokenizer_object=bpe))
    return spelled, [i for d in held for i in bpe.encode(d).ids], len(spelled)


def build_bytes(path: Path, rows: int, tokens: int, k: int, texts: list[Path], vocab: int, uniform: bool) -> dict:
    """A ledger of ``rows`` byte rows of ``tokens`` positions cut from the held-out English text
    (wrapping round); returns what the text is like."""
    from potstill.ledger import Ledger, requests_for
    from potstill.prompts import Prompt
    from potstill.records import Completion

    spelled, held, size = english_tokens(texts, vocab)
    rng = np.random.default_rng(0)
    freq = np.bincount(held, minlength=size).astype(np.float64)
    weights = np.ones(size) / size if uniform else freq / freq.sum()
    ids = np.resize(np.array(held), rows * tokens).reshape(rows, tokens)
    pool = iter(rng.choice(size, size=rows * tokens * 4 * k, p=weights).tolist())  # candidates, in order
    with Ledger(path) as ledger:
        key = ledger.register_teacher({"id": "synthetic-bytes", "backend": "openai", "model": "m"})
        prompts = [Prompt((("user", f"write {i}"),), {"id": str(i)}) for i in range(rows)]
        todo = ledger.add_requests(key, requests_for(key, prompts, {"seed": 0}, 1), {"seed": 0})
        session = ledger.start_session(None)
        for start in range(0, rows, 100):
            batch = []
            for r, request in enumerate(todo[start:start + 100], start):
                top = []
                for i in ids[r].tolist():
                    row = [i]
                    while len(row) < k:
                        j = next(pool)
                        if j not in row:
                            row.append(j)
                    top.append([spelled[j] for j in row])
                chosen = [spelled[i] for i in ids[r].tolist()]
                lps = -np.sort(rng.random((tokens, k)).astype(np.float32), 1) * 5
                batch.append(Completion(request.request_hash, b"".join(chosen).decode("utf-8", "replace"), None, None,
                                        lps, "length", 4, 0, 0.0, token_logprobs=lps[:, 0].copy(),
                                        token_bytes=chosen, topk_bytes=top))
            ledger.record(session, batch)
    alternatives = np.array([len(spelled[j]) for j in range(size)]) @ weights
    return {"text_bytes_per_token": float(np.mean([len(spelled[i]) for i in held])),
            "alternative_bytes": float(alternatives), "vocab": size, "held_out_tokens": len(held)}


def measure(path: Path, read_bytes: bool = False) -> None:
    from potstill.hf import load_tokenizer_dir
    from potstill.ledger import Ledger
    from potstill.train.examples import build_examples

    tok = load_tokenizer_dir(TEACHER)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    held = rss_kib()
    with Ledger(path) as ledger:
        examples = list(ledger.examples())
    data = examples if read_bytes else build_examples(examples, tok, same_tokenizer=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # held: what the rows read keep resident, which the peak can hide under the imports' own high-water mark
    print(json.dumps({"rows": len(data), "peak_mib": (peak - base) / 1024, "held_mib": (rss_kib() - held) / 1024}))


def rss_kib() -> int:
    """This process's resident memory now (Linux), KiB."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))


def main_bytes(args) -> None:
    texts = args.text or sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"])
    path = args.dir / f"ledger-bytes-{args.rows}x{args.tokens}x{args.k}-v{args.vocab}{'-uniform' * args.uniform}.sqlite"
    path.unlink(missing_ok=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    text = build_bytes(path, args.rows, args.tokens, args.k, texts, args.vocab, args.uniform)
    from potstill.ledger import Ledger

    with Ledger(path) as ledger:
        per_token = ledger.bytes_per_token()
    out = json.loads(subprocess.run([sys.executable, __file__, "--measure-bytes", str(path)], check=True,
                                    capture_output=True, text=True).stdout)
    stored = per_token * args.rows * args.tokens
    ids = 4 + args.k * (4 + 2)
    print(f"{args.rows:,} rows x {args.tokens} tokens x top-{args.k} as bytes, English ({text['held_out_tokens']:,} "
          f"held-out tokens, a {text['vocab']:,}-token byte-level BPE: {text['text_bytes_per_token']:.2f} bytes per "
          f"token of text, {text['alternative_bytes']:.2f} per alternative{', drawn uniformly' * args.uniform}): "
          f"{per_token:.1f} stored bytes per token ({per_token / ids:.2f}x the {ids} of ids); "
          f"the examples read hold {out['held_mib']:.0f} MiB ({out['held_mib'] * 2**20 / stored:.2f}x the "
          f"{stored / 2**20:.0f} MiB stored)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ledger-memory"))
    p.add_argument("--bytes", action="store_true", help="token bytes from English text instead of ids")
    p.add_argument("--vocab", type=int, default=8000, help="--bytes: the byte-level BPE's vocabulary")
    p.add_argument("--uniform", action="store_true", help="--bytes: alternatives drawn uniformly over the vocabulary")
    p.add_argument("--text", type=Path, nargs="*", help="--bytes: English text files (default: docs/*.md, README.md)")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--measure-bytes", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure or args.measure_bytes:
        return measure(args.measure or args.measure_bytes, read_bytes=bool(args.measure_bytes))
    if args.bytes:
        return main_bytes(args)
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
