"""``darkstore report DIR``: one self-contained page about the runs under DIR.

DIR is a sweep's output, a run, or any folder holding runs (folders with ``summary.json``).
The report (``DIR/report/report.html`` or ``report.md``, PNGs beside it; the HTML embeds
them) shows:

* learning curves — held-out accuracy and training loss per epoch, one line per run;
* accuracy against temperature and against α — mean ± std over the runs that share a value
  (over seeds, and over any other axis unless it is fixed);
* a reliability diagram — the best run's calibration next to the teacher ensemble's;
* the student-versus-teachers table — accuracy, agreement, NLL, ECE, parameters, bytes on
  disk, CPU latency and throughput;
* the results table of a sweep (mean ± std over seeds).

Every number plotted is also written to ``report.json``, read from the runs' own files.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from student_trainer.errors import RunDirError

from .sweep import METRICS, group_table, markdown_table, mean_std


def find_runs(root: Path) -> list[Path]:
    root = Path(root)
    if (root / "summary.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("summary.json") if "export" not in p.parts)


def load_run(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
    return {"path": run, "name": run.name, "summary": s, "history": hist, "eval": ev, "config": s["config"]}


def _varying(runs: list[dict[str, Any]]) -> list[str]:
    keys = ["temperature", "alpha", "loss", "student", "lr", "epochs", "batch_size", "schedule", "seed"]
    out = []
    for k in keys:
        vals = {json.dumps(r["config"].get(k), sort_keys=True) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("name") or f"{value.get('arch')}{value.get('arch_kwargs') or ''}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict[str, Any]], path: Path, axes: list[str]) -> dict[str, Any]:
    """One line per run; runs that differ only by seed share a colour."""
    plt = _plots()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    series = {}
    groups: dict[str, int] = {}
    for r in runs:
        g = ", ".join(f"{a}={_label(r['config'].get(a))}" for a in axes if a != "seed") or "runs"
        first = g not in groups
        colour = f"C{groups.setdefault(g, len(groups)) % 10}"
        ep = [h["epoch"] for h in r["history"]]
        acc = [h.get("eval_accuracy") for h in r["history"]]
        loss = [h["train_loss"] for h in r["history"]]
        series[r["name"]] = {"epoch": ep, "eval_accuracy": acc, "train_loss": loss}
        if any(a is not None for a in acc):
            a1.plot(ep, [100 * a if a is not None else math.nan for a in acc], lw=1, color=colour,
                    label=g if first else None)
        a2.plot(ep, loss, lw=1, color=colour)
    a1.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="learning curves")
    a2.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    if len(groups) <= 12:
        a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


def plot_hyper(runs: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Accuracy against temperature and against α (mean ± std over runs sharing the value)."""
    plt = _plots()
    names = {"temperature": "temperature T", "alpha": "α (weight of the soft term)"}
    data: dict[str, Any] = {}
    keys = [k for k in names if len({r["config"][k] for r in runs}) > 1] or list(names)
    fig, axs = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axs[0], keys):
        name = names[key]
        vals = sorted({r["config"][key] for r in runs})
        pts = []
        for v in vals:
            accs = [r["summary"]["final"].get("accuracy") for r in runs if r["config"][key] == v]
            mu, sd = mean_std(accs)
            pts.append({"value": v, "mean": mu, "std": sd, "n": len(accs)})
        data[key] = pts
        ax.errorbar([p["value"] for p in pts], [100 * p["mean"] for p in pts], yerr=[100 * p["std"] for p in pts],
                    marker="o", capsize=4)
        ax.set(xlabel=name, ylabel="held-out accuracy (%)", title=f"accuracy vs {key} (mean ± std, n = "
               + "/".join(sorted({str(p["n"]) for p in pts})) + ")")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


def plot_reliability(run: dict[str, Any], path: Path) -> dict[str, Any]:
    plt = _plots()
    ev = run["eval"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    out = {}
    for key, label in (("reliability", f"student {run['name']}"), ("teacher_reliability", "teacher ensemble")):
        rel = ev.get(key)
        if not rel:
            continue
        mids = [(a + b) / 2 for a, b in zip(rel["edges"][:-1], rel["edges"][1:])]
        used = [i for i, c in enumerate(rel["count"]) if c > 0]
        ax.plot([rel["confidence"][i] for i in used], [rel["accuracy"][i] for i in used], marker="o",
                label=f"{label} (ECE {100 * rel['ece']:.2f} %)")
        out[key] = {"bin_mid": [mids[i] for i in used], "confidence": [rel["confidence"][i] for i in used],
                    "accuracy": [rel["accuracy"][i] for i in used], "count": [rel["count"][i] for i in used],
                    "ece": rel["ece"]}
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def student_vs_teachers(run: dict[str, Any]) -> list[dict[str, str]]:
    ev = run["eval"]
    m, tm, comp = ev["metrics"], ev["teacher_metrics"], ev["compression"]
    st, te = comp["student"], comp["teachers"]
    pct = lambda v: _num(None if v is None else 100 * v, ".2f")  # noqa: E731
    rows = [
        {"": "held-out accuracy (%)", "student": pct(m.get("accuracy")), "teachers": pct(tm.get("accuracy"))},
        {"": "agreement with teachers (%)", "student": pct(m.get("agreement")), "teachers": "100.00"},
        {"": "NLL", "student": _num(m.get("nll"), ".4f"), "teachers": _num(tm.get("nll"), ".4f")},
        {"": "ECE (%)", "student": pct(m.get("ece")), "teachers": pct(tm.get("ece"))},
        {"": "parameters", "student": f"{st['params']:,}", "teachers": f"{te['params']:,} ({te['members']} members)"},
        {"": "size on disk (KiB)", "student": _num(st.get("size_bytes") and st["size_bytes"] / 1024, ".1f"),
         "teachers": _num(te.get("size_bytes") and te["size_bytes"] / 1024, ".1f")},
        {"": "CPU latency, batch 1 (ms)", "student": _num(st.get("latency_ms_batch1"), ".3f"),
         "teachers": _num(te.get("latency_ms_batch1"), ".3f")},
        {"": "CPU throughput (samples/s)", "student": _num(st.get("throughput_per_s"), ",.0f"),
         "teachers": _num(te.get("throughput_per_s"), ",.0f")},
    ]
    return rows


def _md_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]) + "\n"


def _html_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[h]))}</td>" for h in head) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def make_report(root: str | Path, *, fmt: str = "html", out: str | Path | None = None) -> Path:
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise RunDirError(f"no finished runs under {root} (a run is a folder with summary.json)")
    runs = [load_run(p) for p in paths]
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in runs if r["summary"]["final"].get("accuracy") is not None]
    best = max(scored, key=lambda r: r["summary"]["final"]["accuracy"]) if scored else runs[0]
    axes = _varying(runs)
    flat = [{"run": r["name"], **{a: (_label(v) if isinstance(v := r["config"].get(a), dict) else v) for a in axes},
             **{m: r["summary"]["final"].get(m) for m in METRICS}} for r in runs]
    table = group_table(flat, axes)
    data: dict[str, Any] = {"runs": [r["name"] for r in runs], "best": best["name"], "axes": axes,
                            "curves": plot_curves(runs, out / "curves.png", axes),
                            "hyper": plot_hyper(runs, out / "hyper.png"), "table": table}
    images = ["curves.png", "hyper.png"]
    if best["eval"]:
        data["reliability"] = plot_reliability(best, out / "reliability.png")
        images.append("reliability.png")
        data["student_vs_teachers"] = student_vs_teachers(best)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))

    title = f"darkstore report: {root.resolve().name}"
    store = runs[0]["summary"]["store"]
    intro = (f"{len(runs)} run(s) distilled from `{store}`. Best held-out accuracy: **{best['name']}** "
             f"({_num(100 * best['summary']['final'].get('accuracy', math.nan), '.2f')} %).")
    captions = {"curves.png": "Learning curves", "hyper.png": "Accuracy against temperature and α (mean ± std)",
                "reliability.png": f"Reliability diagram: {best['name']} and the teacher ensemble"}
    if fmt == "md":
        parts = [f"# {title}\n", intro + "\n"]
        if data.get("student_vs_teachers"):
            parts += [f"## Student ({best['name']}) vs teachers\n", _md_table(data["student_vs_teachers"])]
        parts += ["## Results (mean ± std over seeds)\n", markdown_table(table, axes)]
        parts += [f"## {captions[i]}\n\n![{captions[i]}]({i})\n" for i in images]
        path = out / "report.md"
        path.write_text("\n".join(parts))
    elif fmt == "html":
        def img(name: str) -> str:
            b = base64.b64encode((out / name).read_bytes()).decode()
            return f'<figure><img alt="{html.escape(captions[name])}" src="data:image/png;base64,{b}"><figcaption>{html.escape(captions[name])}</figcaption></figure>'

        res_rows = [{**{a: str(r[a]) for a in axes if a != "seed"}, "n": str(r["n"]),
                     **{f"{m} (mean ± std)": (f"{100 * r[m + '_mean']:.2f} ± {100 * r[m + '_std']:.2f} %"
                                              if m in ("accuracy", "agreement") else
                                              f"{r[m + '_mean']:.4f} ± {r[m + '_std']:.4f}") for m in METRICS}}
                    for r in table]
        body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro).replace('**', '')}</p>"]
        if data.get("student_vs_teachers"):
            body += [f"<h2>Student ({html.escape(best['name'])}) vs teachers</h2>",
                     _html_table(data["student_vs_teachers"])]
        body += ["<h2>Results (mean ± std over seeds)</h2>", _html_table(res_rows)]
        body += [img(i) for i in images]
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:right}img{max-width:100%}figcaption{color:#555;font-size:90%}")
        path = out / "report.html"
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    else:
        raise ValueError(f"unknown report format {fmt!r}: html or md")
    return path
