"""HTTP teacher benchmarks on loopback (tests/mock_endpoint.py), written to docs/benchmarks.md by hand.

    python bench/http_bench.py throughput   # C/L scaling: requests/s against C / latency, C = 1..64
    python bench/http_bench.py faults       # 30 % 429 with Retry-After; 10 % transient faults
    python bench/http_bench.py kills        # SIGKILL at 20 random moments in a 2,000-prompt run

Each prints one JSON line per measurement.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["POTSTILL_QUIET"] = "1"

from mock_endpoint import Faults, MockEndpoint, request_shas  # noqa: E402

from potstill.generate import generate  # noqa: E402
from potstill.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "examples" / "quickstart" / "recipe.yaml"


def recipe_for(out: str, url: str, n: int, *extra: str):
    return load_recipe(RECIPE, [f"output_dir={out}", f"prompts.limit={n}", "teacher.backend=openai",
                                "teacher.model=mock", f"teacher.endpoints=[{url}]", "generation.top_logprobs=20",
                                "teacher.token_ids=true", *extra])


def mock_process(latency: float, faults: dict | None = None):
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "mock_endpoint.py"), "--latency", str(latency),
                             "--faults", json.dumps(faults or {})], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def throughput() -> None:
    for latency in (1.0, 0.25):
        throughput_at(latency)


def throughput_at(latency: float) -> None:
    proc, url = mock_process(latency)
    try:
        with tempfile.TemporaryDirectory() as out:
            generate(recipe_for(out, url, 4))  # warm-up: imports and the tokenizer load are not the endpoint's time
        for c in (1, 8, 16, 32, 64):
            n = max(40, c * 16)
            with tempfile.TemporaryDirectory() as out:
                recipe = recipe_for(out, url, n, f"teacher.concurrency={c}")
                start = time.perf_counter()
                counts = generate(recipe)
                seconds = time.perf_counter() - start
            rate = n / seconds
            print(json.dumps({"bench": "throughput", "latency_s": latency, "concurrency": c, "requests": n,
                              "done": counts["done"], "req_per_s": round(rate, 1), "ideal": c / latency,
                              "fraction_of_ideal": round(rate / (c / latency), 3)}), flush=True)
    finally:
        proc.terminate()


def faults() -> None:
    for name, fault, n in (("429 30% Retry-After 1 s", {"rate_limit": 0.3, "retry_after": "1"}, 2000),
                           ("transient 10%", {"server_error": 0.04, "reset": 0.03, "truncated": 0.03}, 2000)):
        mock = MockEndpoint(0.05, Faults(**fault)).start_in_thread()
        try:
            with tempfile.TemporaryDirectory() as out:
                recipe = recipe_for(out, mock.url, n, "teacher.concurrency=64")
                start = time.perf_counter()
                try:
                    counts = generate(recipe)
                except Exception as e:  # report, do not hide
                    counts = {"error": str(e)}
                seconds = time.perf_counter() - start
                first_run_sends = len(mock.log)
                # a rerun sends only what the first run gave up on
                counts["done_after_rerun"] = generate(recipe)["done"]
                counts["rerun_sends"] = len(mock.log) - first_run_sends
                del mock.log[first_run_sends:]
        finally:
            mock.stop_thread()
        per_body = Counter(sha for _, sha, _ in mock.log)
        gaps, last = [], {}
        for t, sha, what in mock.log:
            if sha in last:
                gaps.append(t - last.pop(sha))
            if what == "rate_limit":
                last[sha] = t
        print(json.dumps({"bench": "faults", "case": name, "prompts": n, "done": counts.get("done"),
                          "failed": counts.get("failed"), "done_after_rerun": counts.get("done_after_rerun"),
                          "rerun_sends": counts.get("rerun_sends"), "sends": len(mock.log),
                          "attempts_per_prompt": round(len(mock.log) / n, 3),
                          "max_attempts": max(per_body.values()),
                          "attempt_histogram": dict(sorted(Counter(per_body.values()).items())),
                          "retry_gaps_after_429_min_s": round(min(gaps), 3) if gaps else None,
                          "waits_shorter_than_retry_after": sum(g < 1.0 for g in gaps),
                          "outcomes": dict(Counter(w for _, _, w in mock.log)), "seconds": round(seconds, 1)}),
              flush=True)


def kills() -> None:
    # latency 0.2 s: the uninterrupted run takes ~13 s of sending, room for 20 kills
    n, window, n_kills = 2000, 32, 20
    mock = MockEndpoint(0.2).start_in_thread()
    rng = random.Random(0)
    out = tempfile.mkdtemp()
    ledger = Path(out) / "ledger.sqlite"
    args = [sys.executable, "-m", "potstill.cli", "generate", str(RECIPE), f"output_dir={out}", f"prompts.limit={n}",
            "teacher.backend=openai", "teacher.model=mock", f"teacher.endpoints=[{mock.url}]",
            f"teacher.concurrency={window}", "generation.top_logprobs=20", "teacher.token_ids=true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def done() -> set[str]:
        if not ledger.exists():
            return set()
        with sqlite3.connect(ledger) as db:
            return {r[0] for r in db.execute("SELECT request_hash FROM completions")}

    by_sha = request_shas(recipe_for(out, mock.url, n, f"teacher.concurrency={window}"))

    resent_done, resent_per_kill, kill_log = 0, [], []
    start = time.perf_counter()
    for k in range(n_kills):
        before = len(mock.log)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(mock.log) == before and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_log.append((len(mock.log), done()))
    final = subprocess.run(args, env=env, capture_output=True, text=True)
    kill_log.append((len(mock.log), None))
    for (mark, done_at_kill), (next_mark, _) in zip(kill_log, kill_log[1:]):
        sent_before = {sha for _, sha, _ in mock.log[:mark]}
        after = {sha for _, sha, _ in mock.log[mark:next_mark]}
        resent = {sha for sha in after & sent_before}
        resent_done += sum(by_sha[sha] in done_at_kill for sha in resent)
        resent_per_kill.append(len(resent))
    with sqlite3.connect(ledger) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    final_done = done()
    mock.stop_thread()
    print(json.dumps({"bench": "kills", "prompts": n, "window": window, "kills": len(kill_log) - 1,
                      "final_rc": final.returncode, "done": len(final_done),
                      "lost": len(set(by_sha.values()) - final_done), "resent_done_keys": resent_done,
                      "resent_per_kill_max": max(resent_per_kill), "resent_per_kill": resent_per_kill,
                      "sends": len(mock.log), "integrity_check": integrity,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    {"throughput": throughput, "faults": faults, "kills": kills}[sys.argv[1]]()
