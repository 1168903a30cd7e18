"""HTTP teacher benchmarks on loopback (tests/mock_endpoint.py), written to docs/benchmarks.md by hand.

    python bench/http_bench.py throughput   # C/L scaling: requests/s against C / latency, C = 1..64
    python bench/http_bench.py faults       # 30 % 429 with Retry-After; 10 % transient faults
    python bench/http_bench.py kills        # SIGKILL at 20 random moments in a 2,000-prompt run
    python bench/http_bench.py independent  # bench/fault_server.py: spend vs billed, kills x 10 within
                                            # max_requests, the canary scan
    python bench/http_bench.py throughput --smoke   # 0.05 s latency, C = 1 and 8: the script works (seconds)

Each prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
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


def throughput(smoke: bool = False) -> None:
    # latencies, concurrencies C, requests per connection, fewest requests a run
    latencies, concurrency, per_slot, least = ((0.05,), (1, 8), 4, 8) if smoke else \
        ((1.0, 0.25), (1, 8, 16, 32, 64), 16, 40)
    for latency in latencies:
        throughput_at(latency, concurrency, per_slot, least)


def throughput_at(latency: float, concurrency: tuple[int, ...], per_slot: int, least: int) -> None:
    proc, url = mock_process(latency)
    try:
        with tempfile.TemporaryDirectory() as out:
            generate(recipe_for(out, url, 4))  # warm-up: imports and the tokenizer load are not the endpoint's time
        for c in concurrency:
            n = max(least, c * per_slot)
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


def fault_server(*args: str):
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fault_server.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # a client that gives up is a broken pipe there
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def server_stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as r:
        return json.loads(r.read())


def cli_args(out: str, url: str, n: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "potstill.cli", "generate", str(RECIPE), f"output_dir={out}", f"prompts.limit={n}",
            "teacher.backend=openai", "teacher.model=fault", f"teacher.endpoints=[{url}]", "generation.top_logprobs=5",
            "teacher.token_ids=true", "teacher.timeout=2", "teacher.prices.prompt=1000",
            "teacher.prices.completion=1000", *extra]


def independent() -> None:
    """Against bench/fault_server.py, which bills as a provider does."""
    env = {**os.environ, "POTSTILL_QUIET": "1", "PYTHONPATH": str(ROOT / "src")}
    # 1. spend recorded vs spend billed, attempts per prompt: 10 % faults of 15 kinds, a run and a rerun
    n = 300
    proc, url = fault_server("--faults", "0.1", "--latency", "0.02")
    try:
        with tempfile.TemporaryDirectory() as out:
            runs = [subprocess.run(cli_args(out, url, n, "teacher.concurrency=16"), env=env, capture_output=True,
                                   text=True) for _ in range(2)]
            with sqlite3.connect(Path(out) / "ledger.sqlite") as db:
                ledger = db.execute("SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost), "
                                    "sum(usage_claimed IS NOT NULL) FROM attempts").fetchone()
                status = dict(db.execute("SELECT status, count(*) FROM requests GROUP BY status"))
                reasons = Counter(r.split(":")[0] if not r.startswith("gave up") else r.split(": ", 1)[1][:60]
                                  for (r,) in db.execute("SELECT error FROM requests WHERE status='failed'"))
        billed = server_stats(url)
    finally:
        proc.terminate()
    billed_cost = (billed["billed_prompt_tokens"] + billed["billed_completion_tokens"]) * 1000 / 1e6
    print(json.dumps({"bench": "independent-spend", "prompts": n, "rcs": [r.returncode for r in runs],
                      "status": status, "failed_reasons": dict(reasons), "server": billed,
                      "ledger_sends": ledger[0], "ledger_prompt_tokens": ledger[1],
                      "ledger_completion_tokens": ledger[2], "ledger_cost": round(ledger[3], 4),
                      "server_cost": round(billed_cost, 4), "ledger_over_server": round(ledger[3] / billed_cost, 3),
                      "claims_not_taken": ledger[4], "sends_per_prompt": round(billed["sends"] / n, 3),
                      "stderr_tail": runs[0].stderr.strip().splitlines()[-3:]}), flush=True)

    # 2. kill -9 x 10 with max_requests: the endpoint never receives more
    n, budget = 1000, 400
    proc, url = fault_server("--faults", "0.05", "--latency", "0.3")
    rng = random.Random(1)
    try:
        with tempfile.TemporaryDirectory() as out:
            args = cli_args(out, url, n, "teacher.concurrency=16", f"teacher.budget.max_requests={budget}")
            kills = 0
            for _ in range(10):
                before = server_stats(url)["sends"]
                p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while server_stats(url)["sends"] == before and p.poll() is None:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.1, 0.8))
                if p.poll() is not None:
                    break
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
            final = subprocess.run(args, env=env, capture_output=True, text=True)
            with sqlite3.connect(Path(out) / "ledger.sqlite") as db:
                recorded = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
                dangling = db.execute("SELECT count(*) FROM attempts WHERE error LIKE 'sent (or about to be)%'"
                                      ).fetchone()[0]
                done = db.execute("SELECT count(*) FROM completions").fetchone()[0]
        sent = server_stats(url)["sends"]
    finally:
        proc.terminate()
    print(json.dumps({"bench": "independent-kills", "prompts": n, "max_requests": budget, "kills": kills,
                      "server_received": sent, "ledger_sends": recorded, "sends_killed_in_flight": dangling,
                      "done": done, "final_rc": final.returncode, "final_stderr": final.stderr.strip()[-200:]}),
          flush=True)

    # 3. the canary: a key of no known shape, echoed masked and as a prefix by 401s
    rng = random.Random(2)
    key = "s4CANARY" + "".join(rng.choice("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                               for _ in range(24)) + "dEzz"
    grams = {key[i:i + 8] for i in range(len(key) - 7)}
    proc, url = fault_server("--faults", "0.05", "--latency", "0.01", "--kinds", "401_echo")
    try:
        with tempfile.TemporaryDirectory() as out:
            # each 401 stops a run: rerun until the prompts are done, as a user would
            runs = [subprocess.run(cli_args(out, url, 200, "teacher.api_key_env=CANARY_KEY"),
                                   env={**env, "CANARY_KEY": key}, capture_output=True, text=True) for _ in range(8)]
            run = runs[0]
            files = [f for f in Path(out).rglob("*") if f.is_file()]
            leaks = [str(f.name) for f in files if any(g.encode() in f.read_bytes() for g in grams)]
            leaks += [f"{name} of run {i}" for i, r in enumerate(runs) for name, text in
                      (("stdout", r.stdout), ("stderr", r.stderr)) if any(g in text for g in grams)]
            with sqlite3.connect(Path(out) / "ledger.sqlite") as db:
                echoed = db.execute("SELECT count(*) FROM attempts WHERE http_status=401").fetchone()[0]
        echoes = server_stats(url)["faults"].get("401_echo", 0)
    finally:
        proc.terminate()
    print(json.dumps({"bench": "independent-canary", "rcs": [r.returncode for r in runs], "echoes_sent": echoes,
                      "attempt_rows_with_401": echoed, "files_scanned": len(files), "substrings": len(grams),
                      "leaks": leaks, "stderr": run.stderr.strip()[-160:]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["throughput", "faults", "kills", "independent"])
    p.add_argument("--smoke", action="store_true", help="throughput only: one short latency, C = 1 and 8")
    args = p.parse_args()
    if args.smoke and args.bench != "throughput":
        p.error("--smoke is for throughput")
    if args.bench == "throughput":
        throughput(args.smoke)
    else:
        {"faults": faults, "kills": kills, "independent": independent}[args.bench]()


if __name__ == "__main__":
    main()
