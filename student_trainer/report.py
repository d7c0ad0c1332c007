"""``darkstore report DIR``: one self-contained page about the runs under DIR.

DIR is a sweep's output, a run, or any folder holding runs (folders with ``summary.json``).
The report (``DIR/report/report.html`` or ``report.md``, PNGs beside it; the HTML embeds
them) shows:

* learning curves — held-out accuracy per epoch, one line per run, and the training loss in one
  panel per objective (hard-label CE and α·T²·KL + (1−α)·CE are not on one scale);
* accuracy against temperature, one line per α, and against α, one line per T — mean ± std over the
  runs that share both values, n beside each point; at α = 0 T does nothing, so those runs are one
  band on the T panel (a sweep trains them once: its other points link to that run);
* a reliability diagram — the best run's calibration next to the teacher ensemble's, with the rows
  in each bin;
* the student-versus-teachers table — accuracy, agreement, NLL, ECE, parameters, bytes on
  disk, CPU latency and throughput with the torch threads they were timed with;
* the results table of a sweep (mean ± std over seeds).

Every number plotted is also written to ``report.json``, read from the runs' own files.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from student_trainer.errors import RunDirError

from .kinds import run_kind
from .sweep import format_metric, group_table, markdown_table, mean_std


@dataclass(frozen=True)
class Headline:
    """The held-out metric a report plots and ranks runs by: accuracy for classes, perplexity for language
    models (lower is better)."""
    key: str
    label: str
    higher_is_better: bool
    percent: bool

    def shown(self, v: float | None) -> float:
        return math.nan if v is None else (100 * v if self.percent else v)

    @property
    def axis(self) -> str:
        return f"{self.label} (%)" if self.percent else self.label


ACCURACY = Headline("accuracy", "held-out accuracy", True, True)


def headline_of(runs: list[dict[str, Any]]) -> Headline:
    """The number the report leads with: the runs' kind's (held-out accuracy, or perplexity)."""
    return Headline(*run_kind(runs[0]["summary"]).headline)


def find_runs(root: Path) -> list[Path]:
    """The run folders under ``root``, each once: a sweep's link to another point's run (a point identical in
    effect) is not a second run (:func:`run_aliases` names it)."""
    root = Path(root)
    if (root / "summary.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("summary.json") if "export" not in p.parts)


def run_aliases(root: Path) -> dict[Path, list[str]]:
    """For each run folder under ``root`` that sweep points link to, the names of those links."""
    out: dict[Path, list[str]] = {}
    for link in Path(root).rglob("*"):
        if link.is_symlink() and (link / "summary.json").is_file():
            out.setdefault(link.resolve(), []).append(link.name)
    return out


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


def _objective(config: dict[str, Any]) -> str:
    """What a run's training loss measures: losses of different objectives are not on one scale."""
    if config.get("loss") == "ce" or config.get("alpha") == 0:
        return "hard-label CE"
    if config.get("loss") == "mse":
        return "α·MSE(logits) + (1−α)·CE"
    return "α·T²·KL + (1−α)·CE"


def plot_curves(runs: list[dict[str, Any]], path: Path, axes: list[str], head: Headline = ACCURACY) -> dict[str, Any]:
    """Held-out accuracy, one line per run (runs that differ only by seed share a colour), and the training loss
    in one panel per objective (hard-label CE and α·T²·KL + (1−α)·CE are not on one scale)."""
    plt = _plots()
    objectives = sorted({_objective(r["config"]) for r in runs})
    fig, panels = plt.subplots(1, 1 + len(objectives), figsize=(5 * (1 + len(objectives)), 3.8), squeeze=False)
    a1, loss_axes = panels[0][0], dict(zip(objectives, panels[0][1:]))
    series = {}
    groups: dict[str, int] = {}
    for r in runs:
        g = ", ".join(f"{a}={_label(r['config'].get(a))}" for a in axes if a != "seed") or "runs"
        first = g not in groups
        colour = f"C{groups.setdefault(g, len(groups)) % 10}"
        ep = [h["epoch"] for h in r["history"]]
        acc = [h.get(f"eval_{head.key}") for h in r["history"]]
        loss = [h["train_loss"] for h in r["history"]]
        series[r["name"]] = {"epoch": ep, f"eval_{head.key}": acc, "train_loss": loss,
                             "objective": _objective(r["config"]), "same_as": r.get("aliases", [])}
        label = (g + (f" (= {', '.join(r['aliases'])})" if r.get("aliases") else "")) if first else None
        if any(a is not None for a in acc):
            a1.plot(ep, [head.shown(a) for a in acc], lw=1, color=colour, label=label)
        loss_axes[_objective(r["config"])].plot(ep, loss, lw=1, color=colour)
    a1.set(xlabel="epoch", ylabel=head.axis, title="learning curves")
    for name, ax in loss_axes.items():
        ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title=f"training loss: {name}")
        _plain_log_ticks(ax)
    if len(groups) <= 12:  # below the panels, never over a curve
        fig.legend(*a1.get_legend_handles_labels(), loc="lower center", ncol=min(4, max(1, len(groups))),
                   fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(groups) - 1) // 4) if len(groups) <= 12 else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


def _plain_log_ticks(ax) -> None:
    """Log-axis ticks as plain numbers (4.2, not 4.2×10⁰); minor ticks labelled only when the axis spans less than
    a decade (else the major ones are enough)."""
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):
        lo, hi = ax.get_ylim()
        return f"{v:g}" if hi < 10 * max(lo, 1e-300) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _mean_points(runs: list[dict[str, Any]], key: str, head: Headline = ACCURACY) -> list[dict[str, Any]]:
    pts = []
    for v in sorted({r["config"][key] for r in runs}):
        accs = [r["summary"]["final"].get(head.key) for r in runs if r["config"][key] == v]
        mu, sd = mean_std(accs)
        pts.append({"value": v, "mean": mu, "std": sd, "n": len(accs)})
    return pts


def plot_hyper(runs: list[dict[str, Any]], path: Path, head: Headline = ACCURACY) -> dict[str, Any]:
    """Accuracy against T, one line per α, and against α, one line per T (mean ± std over the runs that share
    both values, n beside each point). T does nothing at α = 0 (hard labels only): those runs are one
    horizontal band on the T panel, and the shared α = 0 point on every line of the α panel."""
    plt = _plots()
    alphas = sorted({r["config"]["alpha"] for r in runs})
    temps = sorted({r["config"]["temperature"] for r in runs})
    keys = [k for k, vals in (("temperature", temps), ("alpha", alphas)) if len(vals) > 1] or ["temperature", "alpha"]
    fig, axs = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    data: dict[str, Any] = {}
    hard = [r for r in runs if r["config"]["alpha"] == 0]
    for ax, key in zip(axs[0], keys):
        lines: dict[str, Any] = {}
        if key == "temperature":
            if hard:
                mu, sd = mean_std([r["summary"]["final"].get(head.key) for r in hard])
                ax.axhline(head.shown(mu), color="k", ls="--", lw=1, label=f"α = 0: T unused (n = {len(hard)})")
                ax.axhspan(head.shown(mu - sd), head.shown(mu + sd), color="k", alpha=0.08)
                lines["alpha=0"] = {"mean": mu, "std": sd, "n": len(hard), "temperature": "unused"}
            for i, a in enumerate(a for a in alphas if a != 0):
                pts = _mean_points([r for r in runs if r["config"]["alpha"] == a], "temperature", head)
                lines[f"alpha={a:g}"] = pts
                _errorbar(ax, pts, f"α = {a:g}", f"C{i % 10}", head)
            ax.set(xlabel="temperature T", title=f"{head.key} vs T, one line per α")
        else:
            for i, t in enumerate(temps):
                pts = _mean_points([r for r in runs if r["config"]["temperature"] == t or r["config"]["alpha"] == 0],
                                   "alpha", head)
                lines[f"T={t:g}"] = pts
                _errorbar(ax, pts, f"T = {t:g}", f"C{i % 10}", head)
            ax.set(xlabel="α (weight of the soft term)", title=f"{head.key} vs α, one line per T")
        ax.set(ylabel=head.axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        data[key] = lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


def _errorbar(ax, pts: list[dict[str, Any]], label: str, colour: str, head: Headline = ACCURACY) -> None:
    xs, ys = [p["value"] for p in pts], [head.shown(p["mean"]) for p in pts]
    ax.errorbar(xs, ys, yerr=[head.shown(p["std"]) for p in pts], marker="o", capsize=4, label=label, color=colour)
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(f"n={p['n']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=colour)


def plot_reliability(run: dict[str, Any], path: Path) -> dict[str, Any]:
    """Accuracy against confidence per bin, with how many held-out rows fell in each bin underneath (a bin of
    three rows says little)."""
    plt = _plots()
    ev = run["eval"]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    out = {}
    entries = [(k, lb) for k, lb in (("reliability", f"student {run['name']}"), ("teacher_reliability",
                                                                                  "teacher ensemble")) if ev.get(k)]
    width = 1 / 15 / (len(entries) or 1)
    for j, (key, label) in enumerate(entries):
        rel = ev[key]
        mids = [(a + b) / 2 for a, b in zip(rel["edges"][:-1], rel["edges"][1:])]
        used = [i for i, c in enumerate(rel["count"]) if c > 0]
        ax.plot([rel["confidence"][i] for i in used], [rel["accuracy"][i] for i in used], marker="o",
                color=f"C{j}", label=f"{label} (ECE {100 * rel['ece']:.2f} %)")
        hx.bar([rel["edges"][i] + (j + 0.5) * width for i in used], [rel["count"][i] for i in used], width=width,
               color=f"C{j}")
        out[key] = {"bin_mid": [mids[i] for i in used], "confidence": [rel["confidence"][i] for i in used],
                    "accuracy": [rel["accuracy"][i] for i in used], "count": [rel["count"][i] for i in used],
                    "ece": rel["ece"]}
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    hx.set(xlabel="confidence", ylabel="rows per bin", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def _md_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]) + "\n"


def _html_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[h]))}</td>" for h in head) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def best_setting(runs: list[dict[str, Any]], flat: list[dict[str, Any]], table: list[dict[str, Any]],
                 axes: list[str], head: Headline = ACCURACY) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The setting (every axis but the seed) with the best mean of the headline metric over its seeds, and the
    run of it shown in detail: the one nearest that mean (one seed's luck picks neither)."""
    keys = [a for a in axes if a != "seed"]
    mean, std = f"{head.key}_mean", f"{head.key}_std"
    scored = [row for row in table if row.get(mean) is not None and not math.isnan(row[mean])]
    if not scored:
        return None, runs[0]
    top = (max if head.higher_is_better else min)(scored, key=lambda row: row[mean])
    members = [(r, f) for r, f in zip(runs, flat) if all(json.dumps(f.get(k), sort_keys=True) ==
                                                          json.dumps(top.get(k), sort_keys=True) for k in keys)]
    shown = min(members, key=lambda rf: abs((rf[1][head.key] or 0) - top[mean]))[0]
    setting = {**{k: top.get(k) for k in keys}, "n": top["n"], mean: top[mean], std: top[std]}
    return setting, shown


def _best_sentence(setting: dict[str, Any] | None, shown: dict[str, Any], head: Headline = ACCURACY) -> str:
    if setting is None:
        return f"No run has a {head.label}."
    mean, std = f"{head.key}_mean", f"{head.key}_std"
    what = ", ".join(f"{k}={_label(v)}" for k, v in setting.items() if k not in ("n", mean, std)) or "the runs"
    unit, fmt = (" %", ".2f") if head.percent else ("", ".3f")
    spread = f" ± {format(head.shown(setting[std]), fmt)}" if setting["n"] > 1 else ""
    return (f"Best setting by mean {head.label} over its {setting['n']} seed(s): **{what}** "
            f"({format(head.shown(setting[mean]), fmt)}{spread}{unit}); its run nearest that mean, {shown['name']}, "
            "is the one shown in detail below.")


def _figures(runs: list[dict[str, Any]], best: dict[str, Any], out: Path, axes: list[str],
             head: Headline) -> tuple[dict[str, Any], list[str]]:
    """The report's plots (PNG files in ``out``) and tables, with every number they show; the image names."""
    data: dict[str, Any] = {"curves": plot_curves(runs, out / "curves.png", axes, head)}
    images = ["curves.png"]
    if len({(r["config"]["temperature"], r["config"]["alpha"]) for r in runs}) > 1:  # else nothing to plot against
        data["hyper"] = plot_hyper(runs, out / "hyper.png", head)
        images.append("hyper.png")
    if best["eval"] and best["eval"].get("reliability"):
        data["reliability"] = plot_reliability(best, out / "reliability.png")
        images.append("reliability.png")
    if best["eval"]:
        data["student_vs_teachers"] = run_kind(best["summary"]).vs_teachers(best)
    return data, images


def make_report(root: str | Path, *, fmt: str = "html", out: str | Path | None = None) -> Path:
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise RunDirError(f"no finished runs under {root} (a run is a folder with summary.json)")
    runs = [load_run(p) for p in paths]
    aliases = run_aliases(root)
    for r in runs:
        r["aliases"] = sorted(aliases.get(r["path"].resolve(), []))
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    axes = _varying(runs)
    head = headline_of(runs)
    metrics = run_kind(runs[0]["summary"]).metrics
    flat = [{"run": r["name"], **{a: (_label(v) if isinstance(v := r["config"].get(a), dict) else v) for a in axes},
             **{m: r["summary"]["final"].get(m) for m in metrics}} for r in runs]
    table = group_table(flat, axes, metrics)
    setting, best = best_setting(runs, flat, table, axes, head)
    data, images = _figures(runs, best, out, axes, head)
    data = {"runs": [r["name"] for r in runs], "best": best["name"], "best_setting": setting, "axes": axes,
            "table": table, **data}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))

    title = f"darkstore report: {root.resolve().name}"
    store = runs[0]["summary"]["store"]
    intro = f"{len(runs)} run(s) distilled from `{store}`. " + _best_sentence(setting, best, head)
    captions = {"curves.png": "Learning curves",
                "hyper.png": f"{head.label.capitalize()} against temperature and α (mean ± std)",
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
                     **{f"{m} (mean ± std)": format_metric(m, r[m + "_mean"], r[m + "_std"]) for m in metrics}}
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
