"""The report stage: one self-contained ``report.html`` (plots embedded as PNG) and a summary
table, from the run directory's eval.json and training logs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from potstill.errors import PotstillError

COLUMNS = [  # (key in eval.json, header, format)
    ("accuracy", "accuracy", "{:.1%}"),
    ("agreement", "agree", "{:.1%}"),  # same answer as the teacher
    ("kl_per_token", "KL/tok", "{:.3f}"),  # KL(teacher || model) per token of teacher text
    ("top1_agreement", "top-1", "{:.1%}"),  # same argmax as the teacher on teacher text
    ("parameters", "params", "{:,}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),  # greedy generation, batched
]


def summary_rows(eval_report: dict) -> list[list[str]]:
    rows = []
    for name, m in eval_report["models"].items():
        rows.append([name] + [fmt.format(m[key]) if m.get(key) is not None else "-" for key, _, fmt in COLUMNS])
    return rows


def _read_logs(run: Path) -> dict[str, list[dict]]:
    logs = {}
    for path in sorted((run / "logs").glob("*.jsonl")):
        logs[path.stem] = [json.loads(line) for line in path.open() if line.strip()]
    return logs


def _png(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _plots(run: Path, eval_report: dict, logs: dict[str, list[dict]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    images = {}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=f"{name}: loss")
        axes[0].plot(steps, [r["ce"] for r in rows], "--", label=f"{name}: CE")
        if any(r.get("kd") is not None for r in rows):
            axes[1].plot(steps, [r["kd"] for r in rows], label=f"{name}: KD (x T^2)")
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title="KD term", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    images["Training curves"] = _png(fig, out_dir / "training.png")
    plt.close(fig)

    models = eval_report["models"]
    cats = sorted({c for m in models.values() for c in m["accuracy_by_category"]})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / max(len(models), 1)
    for i, (name, m) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [m["accuracy_by_category"].get(c, 0) for c in cats], width, label=name)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(cats))], cats)
    ax.set(title="held-out accuracy by category", ylim=(0, 1))
    ax.legend(fontsize=8)
    images["Accuracy by category"] = _png(fig, out_dir / "accuracy.png")
    plt.close(fig)
    return images


def write_report(run: str | Path) -> Path:
    run = Path(run)
    eval_path = run / "eval.json"
    if not eval_path.is_file():
        raise PotstillError(f"{eval_path} not found: run `potstill eval` first")
    eval_report = json.loads(eval_path.read_text())
    logs = _read_logs(run)
    images = _plots(run, eval_report, logs)

    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ["model"] + [h for _, h, _ in COLUMNS])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in summary_rows(eval_report))
    figures = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{b64}'>" for t, b64 in images.items())
    models = eval_report["models"]
    names = list(models)
    samples = "".join(
        "<tr>" + f"<td><code>{esc(s['prompt'])}</code></td>"
        + "".join(f"<td><code>{esc(models[n]['samples'][i]['answer'])}</code></td>" for n in names) + "</tr>"
        for i, s in enumerate(models["teacher"]["samples"])
    )
    training = ""
    for name in names[1:]:
        info_path = run / name / "potstill.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            t = info["train"]
            training += (f"<li><b>{esc(name)}</b>: {esc(info['objective'])}, kd_ratio {t['kd_ratio']}, T {t['temperature']}, "
                         f"{info['steps']} steps on {info['examples']} examples, {info['seconds']:.0f}s; "
                         f"ledger <code>{info['ledger_sha256'][:16]}</code></li>")
    prov = esc(json.dumps(eval_report["provenance"], indent=2))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>potstill report: {esc(run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; }}
</style></head><body>
<h1>potstill report: {esc(run.name)}</h1>
<p>{eval_report['prompts']['n']} held-out prompts, greedy decoding for every model.</p>
<h2>Summary</h2><table><tr>{head}</tr>{body}</table>
<h2>Students</h2><ul>{training}</ul>
{figures}
<h2>Samples</h2><table><tr><th>prompt</th>{''.join(f'<th>{esc(n)}</th>' for n in names)}</tr>{samples}</table>
<h2>Provenance</h2><pre>{prov}</pre>
</body></html>
"""
    out = run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
