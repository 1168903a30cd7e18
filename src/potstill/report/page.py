"""The report stage: one self-contained HTML page (plots embedded as PNG, no network needed) for
one run or several side by side, from each run's eval.json, training logs and students'
potstill.json. The plots are also written as PNG files next to the page."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from potstill.errors import PotstillError

COLUMNS = [  # (key in eval.json, header, format)
    ("accuracy", "accuracy", "{:.1%}"),
    ("retention", "retention", "{:.1%}"),  # accuracy / the teacher's accuracy: how much of its skill was kept
    ("agreement", "agree", "{:.1%}"),  # same answer as the teacher
    ("kl_per_token", "KL/tok", "{:.3f}"),  # KL(teacher || model) per token of teacher text
    ("kl_per_byte", "KL/byte", "{:.4f}"),  # log-likelihood gap on the teacher's answers per byte: any tokenizer
    ("top1_agreement", "top-1", "{:.1%}"),  # same argmax as the teacher on teacher text
    ("acceptance", "accept", "{:.1%}"),  # as the teacher's draft: alpha = sum min(p, q) at the sampling temperature
    ("parameters", "params", "{:,}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),  # greedy generation, batched
]
CURVES = [("loss", "training loss"), ("kd", "KD term (x T^2)"), ("ce", "cross-entropy on teacher tokens"),
          ("grad_norm", "gradient norm"), ("lr", "learning rate"), ("router", "router loss (mixture of experts)")]
# on an on-policy step (GKD) the completions are the student's own samples: its cross-entropy is not
# on the teacher's tokens, so that curve leaves those steps out and says so
ON_TEACHER_TOKENS = ("ce",)


def summary_rows(eval_report: dict) -> list[list[str]]:
    rows = []
    teacher = (eval_report["models"].get("teacher") or {}).get("accuracy")
    for name, m in eval_report["models"].items():
        if teacher and m.get("accuracy") is not None:
            m = {**m, "retention": m["accuracy"] / teacher}
        rows.append([name] + [_cell(m, key, fmt) for key, _, fmt in COLUMNS])
    return rows


def _cell(m: dict, key: str, fmt: str) -> str:
    if m.get(key) is None:
        return "n/a" if key in m.get("not_applicable", {}) else "-"
    text = fmt.format(m[key])
    if (spread := m.get(f"{key}_range")) is not None:  # a measured speed: the median and its range
        text += f" ({fmt.format(spread[0])}-{fmt.format(spread[1])})"
    return text


def _load(run: Path) -> dict:
    eval_path = run / "eval.json"
    if not eval_path.is_file():
        raise PotstillError(f"{eval_path} not found: run `potstill eval` first")
    logs = {p.stem: [r for r in map(json.loads, filter(str.strip, p.open())) if "loss" in r]
            for p in sorted((run / "logs").glob("*.jsonl"))}
    students = {name: json.loads((run / name / "potstill.json").read_text())
                for name in ("student", "baseline") if (run / name / "potstill.json").is_file()}
    same, sessions = None, []
    if (run / "ledger.sqlite").is_file():  # a teacher that ignores temperature gives the same sample every time
        from potstill.ledger import Ledger

        with Ledger(run / "ledger.sqlite") as ledger:
            same = ledger.identical_samples()
            sessions = ledger.sessions()  # the generate sessions, and why each stopped early
    audit = json.loads((run / "audit.json").read_text()) if (run / "audit.json").is_file() else None
    return {"name": run.name, "path": run, "eval": json.loads(eval_path.read_text()), "logs": logs, "students": students,
            "identical_samples": same, "sessions": sessions, "audit": audit}


def _png(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _template(name: str):
    """A page template shipped in ``potstill/report/templates``, autoescaped: a run folder's name, a teacher
    id, a sample's text are all written as text, whatever characters they hold."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("potstill.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True)
    return env.get_template(name)


def _mathtext_safe(label: str) -> str:
    """A label as matplotlib shows it literally: an unescaped ``$`` starts mathtext, and an odd one
    fails the whole figure."""
    return label.replace("$", r"\$")


def _plots(runs: list[dict], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    label = (lambda run, name: _mathtext_safe(f"{run['name']}/{name}" if len(runs) > 1 else name))

    # one colour per model in every plot: the baseline is never drawn in the student's colour
    names = [(run["name"], name) for run in runs for name in [*run["eval"]["models"], *run["logs"]]]
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {key: palette[i % len(palette)] for i, key in enumerate(dict.fromkeys(names))}

    curves = [(key, title) for key, title in CURVES
              if key != "router" or any(r.get("router") is not None for run in runs for rows in run["logs"].values() for r in rows)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, curves):
        left_out = 0
        for run in runs:
            for name, rows in run["logs"].items():
                if key in ON_TEACHER_TOKENS:
                    left_out += sum(1 for r in rows if r.get("on_policy"))
                    rows = [r for r in rows if not r.get("on_policy")]
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), label=label(run, name), color=colour[run["name"], name])
        ax.set(title=title + (f"\n({left_out:,} on-policy step{'s' * (left_out != 1)} left out: their CE is on the student's samples)"
                              if left_out else ""), xlabel="step")
        if key in ("loss", "ce", "kd", "router") and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    images["Training curves"] = _png(fig, out_dir / "training.png")
    plt.close(fig)

    drafts = [(label(run, name), m["draft"], colour[run["name"], name]) for run in runs
              for name, m in run["eval"]["models"].items() if name != "teacher" and (m.get("draft") or {}).get("alpha")]
    if drafts:  # beside the KD term: how the distance trained down shows as acceptance
        images["Draft acceptance"] = _png(acceptance_figure(plt, drafts), out_dir / "acceptance.png")
        plt.close("all")

    bars = [(label(run, name), m, colour[run["name"], name]) for run in runs for name, m in run["eval"]["models"].items()]
    cats = sorted({c for _, m, _ in bars for c in m["accuracy_by_category"]})
    fig, ax = plt.subplots(figsize=(13, 3.8))
    width = 0.8 / max(len(bars), 1)
    for i, (name, m, c) in enumerate(bars):
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [m["accuracy_by_category"].get(cat, 0) for cat in cats], width, label=name, color=c)
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(cats))], [_mathtext_safe(c) for c in cats])
    ax.set(title="held-out accuracy by category", ylim=(0, 1))
    ax.legend(fontsize=7)
    images["Accuracy by category"] = _png(fig, out_dir / "accuracy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(13, 3.5))
    lengths = [(name, m["completion_lengths"], c) for name, m, c in bars if m.get("completion_lengths")]
    if lengths:
        top = max(max(v) for _, v, _ in lengths)
        ax.hist([v for _, v, _ in lengths], bins=range(0, top + 2), label=[n for n, _, _ in lengths],
                color=[c for _, _, c in lengths])
        ax.legend(fontsize=7)
    ax.set(title="completion length (tokens) on the held-out prompts", xlabel="tokens", ylabel="prompts")
    images["Completion lengths"] = _png(fig, out_dir / "lengths.png")
    plt.close(fig)
    return images


def acceptance_figure(plt, drafts: list[tuple[str, dict, str]]):
    """Acceptance by position in the answer (greedy solid, at T dashed) and by category (at T, else greedy)."""
    fig, (by_pos, by_cat) = plt.subplots(1, 2, figsize=(13, 3.8))
    for name, d, c in drafts:
        xs = [b["positions"][0] for b in d["by_position"]]
        by_pos.plot(xs, [b["greedy"] for b in d["by_position"]], marker="o", color=c, label=f"{name}, greedy")
        if d["temperature"]:
            by_pos.plot(xs, [b["sampled"] for b in d["by_position"]], "--", marker="x", color=c,
                        label=f"{name}, T={d['temperature']:g}")
    by_pos.set(title="acceptance by position in the answer (first position of each bucket)",
               xlabel="token position", ylabel="acceptance", ylim=(0, 1.02))
    by_pos.legend(fontsize=7)
    cats = sorted({cat for _, d, _ in drafts for cat in d["by_category"]})
    width = 0.8 / len(drafts)
    for i, (name, d, c) in enumerate(drafts):
        mode = "sampled" if d["temperature"] else "greedy"
        by_cat.bar([j + i * width for j in range(len(cats))],
                   [(d["by_category"].get(cat) or {}).get(mode) or 0 for cat in cats], width, label=name, color=c)
    by_cat.set_xticks([j + width * (len(drafts) - 1) / 2 for j in range(len(cats))], [_mathtext_safe(c) for c in cats])
    t = drafts[0][1]["temperature"]
    by_cat.set(title=f"acceptance by category ({f'T={t:g}' if t else 'greedy'})", ylim=(0, 1.02))
    by_cat.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draft_rows(loaded: list[dict], several: bool) -> list[list[str]]:
    """Each student as a draft of its teacher: alpha, the i.i.d. estimate, and the measured run."""
    rows = []
    for r in loaded:
        for name, m in r["eval"]["models"].items():
            d = m.get("draft")
            if name == "teacher" or not d:
                continue
            alpha, meas = d.get("alpha") or {}, d.get("measured")
            num = (lambda v, fmt="{:.3f}": fmt.format(v) if v is not None else "n/a")
            expected = d.get("expected_tokens_per_step") or {}
            rows.append(([r["name"]] if several else []) + [
                name, f"{d['teacher']['id']} ({(d['teacher']['weights_sha256'] or '-')[:12]})",
                num(alpha.get("greedy")), num(alpha.get("sampled")),
                " / ".join(num((expected.get("greedy") or {}).get(str(g)), "{:.2f}") for g in (1, 2, 4, 8)),
                (f"{meas['tokens_per_step']:.2f} (γ={meas['gamma']}, {meas['prompts']} prompts"
                 + (", universal" if meas["universal"] else "") + ")") if meas else
                "n/a" if "draft_measured" in m.get("not_applicable", {}) else "-",
                (f"{meas['speedup']:.2f}x ({meas['speedup_range'][0]:.2f}-{meas['speedup_range'][1]:.2f}); "
                 f"{meas['teacher_tokens_per_second']:,.0f} -> {meas['assisted_tokens_per_second']:,.0f} tok/s")
                if meas else "-"])
    return rows


def terms_rows(loaded: list[dict], several: bool) -> list[list[str]]:
    """One row per student and teacher: the terms verdict train recorded, and the manifest root."""
    rows = []
    for r in loaded:
        for name, info in r["students"].items():
            terms = info.get("terms")
            if not terms:
                continue
            for t in terms["teachers"]:
                why = terms.get("accepted_risk") or (t.get("declared") if t["verdict"] in ("review", "unknown") else None)
                rows.append(([r["name"]] if several else []) + [
                    name, t["teacher"], f"{t['rows']:,}", t["family"], t["matched_by"], terms["use"], t["verdict"],
                    why or "-", info.get("manifest_merkle_root") or "-"])
    return rows


def write_report(runs: list[str | Path] | str | Path, out: str | Path | None = None) -> Path:
    """One page for ``runs``; written to ``out`` (default: ``<run>/report.html``, or, for several
    runs, ``report.html`` in the first run's parent folder)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    loaded = [_load(Path(r)) for r in runs]
    if out is None:
        out = loaded[0]["path"] / "report.html" if len(loaded) == 1 else loaded[0]["path"].parent / "report.html"
    out = Path(out)
    images = _plots(loaded, out.parent / ("plots" if len(loaded) == 1 else f"{out.stem}-plots"))

    several = len(loaded) > 1
    summary = [([r["name"]] if several else []) + row for r in loaded for row in summary_rows(r["eval"])]
    head = (["run"] if several else []) + ["model"] + [h for _, h, _ in COLUMNS]
    extra = []
    for r in loaded:
        for name, m in r["eval"]["models"].items():
            ci = m.get("accuracy_ci95")
            judge = m.get("judge") or {}
            extra.append(([r["name"]] if several else []) + [
                name, f"[{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "-",
                f"{m['rouge_l']:.3f}" if m.get("rouge_l") is not None else "-",
                f"{m['perplexity_teacher_text']:.3f}" if m.get("perplexity_teacher_text")
                else "n/a" if "perplexity_teacher_text" in m.get("not_applicable", {}) else "-",
                judge_cell(judge) if judge else "-",
                f"{m['latency_ms']:.1f}" if m.get("latency_ms") is not None else "-",
                f"{m['size_bytes'] / 2**20:.2f}" if m.get("size_bytes") is not None else "-"])
    extra_head = (["run"] if several else []) + ["model", "accuracy 95% CI", "ROUGE-L", "perplexity of teacher text",
                                                 "judge win rate vs teacher", "latency (ms)", "size (MiB)"]

    students = []
    for r in loaded:
        for name, info in r["students"].items():
            t = info["train"]
            teachers = "; ".join(f"{d['id']} ({d.get('terms_family', 'unknown')}"
                                 + (f", {d['terms_url']}" if d.get("terms_url") else "") + ")" for d in info["teachers"])
            students.append(([r["name"]] if several else []) + [
                name, info["objective"], t["loss"] if info["objective"] == "kd" else "cross_entropy",
                t["teacher_signal"] if info["objective"] == "kd" else "teacher text",
                str(t["temperature"]) if info["objective"] == "kd" else "-",
                str(t["kd_ratio"]) if info["objective"] == "kd" else "-", f"{info['steps']:,}", f"{info['examples']:,}", teachers, info["ledger_sha256"][:16]])
    students_head = (["run"] if several else []) + ["student", "objective", "loss", "signal", "T", "kd_ratio", "steps",
                                                    "examples", "teachers (terms)", "ledger"]

    drafts = draft_rows(loaded, several)
    drafts_head = (["run"] if several else []) + ["draft", "teacher (weights)", "α greedy (= top-1)", "α at T",
                                                  "E[tokens/step] γ=1/2/4/8, α greedy", "measured tokens/step",
                                                  "measured speed-up (range); teacher -> assisted"]

    sessions = [([r["name"]] if several else []) + session_row(s) for r in loaded for s in r["sessions"]]
    sessions_head = (["run"] if several else []) + ["generate session", "started", "ended", "how it ended"]

    terms = terms_rows(loaded, several)
    terms_head = (["run"] if several else []) + ["student", "teacher", "rows", "terms family", "matched by", "use",
                                                 "verdict", "declared / override reason", "Merkle root of its rows"]

    first = loaded[0]["eval"]["models"]
    names = [n for n in first if first[n].get("samples")]
    samples = [[s["prompt"]] + [first[n]["samples"][i]["answer"] for n in names]
               for i, s in enumerate(first[names[0]]["samples"])] if names else []
    page = _template("report.html.j2").render(
        title=", ".join(r["name"] for r in loaded),
        prompt_counts=[(r["name"], r["eval"]["prompts"]["n"]) for r in loaded],
        identical=[(r["name"], r["identical_samples"]) for r in loaded
                   if r["identical_samples"] and r["identical_samples"]["identical"]],
        summary_head=head, summary=summary, extra_head=extra_head, extra=extra,
        students_head=students_head, students=students, sessions_head=sessions_head, sessions=sessions,
        terms_head=terms_head, terms=terms, figures=list(images.items()), drafts_head=drafts_head, drafts=drafts,
        samples_of=loaded[0]["name"] if several else None, samples_head=["prompt"] + names, samples=samples,
        provenance=[(r["name"], json.dumps(r["eval"]["provenance"], indent=2)) for r in loaded],
        audit_head=(["run"] if several else []) + ["test", "target", "statistic", "p-value", "tokens", "verdict"],
        audit=[([r["name"]] if several else []) + [v["test"], v["target"], v["statistic"], f"{v['p_value']:.3g}",
                                                    v["tokens"] if v["tokens"] is not None else "-",
                                                    "FLAGGED" if v["flagged"] else "not flagged"]
               for r in loaded if r["audit"] for v in r["audit"]["verdicts"]],
        audit_caveats=next((r["audit"]["caveats"] for r in loaded if r["audit"]), []))
    out.write_text(page + "\n", encoding="utf-8")
    return out


def session_row(session: dict) -> list[str]:
    """A ledger session as the report shows it: why it stopped early, as the ledger kept it."""
    ended = session["ended_at"]
    how = (f"stopped: {session['stopped']}" if session["stopped"] else "finished") if ended else \
        "not recorded (killed, or written before ledgers kept how a session ended)"
    return [str(session["session_id"]), session["started_at"], ended or "-", how]


def judge_cell(judge: dict) -> str:
    """The win rate, and the votes left out of it: unparseable replies, and requests an endpoint
    judge failed for good (eval.json before the HTTP judge has no ``failed``)."""
    out = [f"{judge['unparseable']} unparseable"]
    if judge.get("failed"):
        out.append(f"{judge['failed']} failed")
    return f"{judge['win_rate_vs_teacher']:.1%} ({', '.join(out)})"
