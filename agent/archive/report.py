"""``or-agent archive report``: one cohort report from the per-case folders an archive run wrote.

Reads each ``DIR/<case>/`` holding a ``DONE.json`` (``summary.json`` and ``timeline.json``) and writes
``cohort.json`` (every figure), ``cases.csv`` (one row per case) and ``cohort.html`` (tables and the
plots as embedded PNG): per phase the durations of the cohort beside Cholec80's (median, 90th
percentile, maximum) and the cases beyond Cholec80's 90th percentile; alerts per case by rule and
severity; the CVS criteria reached before clipping began (where the model set assesses the CVS); time
out of body, in a scene the models do not know and at low visibility (the overlay pauses); time the phase
model was unsure (while shown); the model
versions; and, for cases with labels, the strict and the official Cholec80 figures (``Evaluate.m``'s
relaxed boundaries, ``pipelines.metrics.official_phase_scores``) per case (precision, recall and Jaccard
as the mean over the phases where they are defined), their mean and sd over cases (as the official
evaluation averages per video) and the accuracy pooled over all labelled frames. Durations are media
time: a time-compressed synthetic case is short.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from pathlib import Path
from typing import Any

from or_agent.agent.archive.run import DONE_FILE, FAILURES_FILE
from or_agent.pipelines.errors import DependencyError, InputError
from or_agent.pipelines.files import atomic_write_bytes, atomic_write_text, make_output_dir
from or_agent.pipelines.messages import PAUSED_UNFAMILIAR
from or_agent.pipelines.metrics import figure, mean_over_phases
from or_agent.pipelines.surgery import PHASE_DURATIONS, PHASES

CVS_REACHED_AT = 0.5  # a criterion counts as met at this probability, as the overlay shows it
UNSURE_BELOW = 0.5  # a phase estimate below this confidence counts as unsure
CLIPPING = "ClippingCutting"
SEVERITIES = ("critical", "warning", "info")


def _spans(rows: list[dict], duration_s: float) -> list[tuple[dict, float]]:
    """Each timeline row with the media time until the next one (the last: until the end)."""
    rows = sorted(rows, key=lambda r: r["frame"])
    ends = [r["time_s"] for r in rows[1:]] + [duration_s]
    return [(r, max(0.0, end - r["time_s"])) for r, end in zip(rows, ends)]


def _cvs_before_clipping(rows: list[dict]) -> dict[str, bool] | None:
    """Per CVS criterion, whether it was reached before the phase model first said ClippingCutting, and
    whether all were at once; None when the set assesses no CVS or clipping was never recognised."""
    labels = sorted({k for r in rows for k in r.get("classifications", {}) if k.startswith("cvs_")})
    clipping = next((i for i, r in enumerate(rows) if r["phase"] == CLIPPING), None)
    if not labels or clipping is None:
        return None
    before = [r.get("classifications", {}) for r in rows[:clipping]]
    out = {k: any(c.get(k, 0.0) >= CVS_REACHED_AT for c in before) for k in labels}
    out["all_at_once"] = any(all(c.get(k, 0.0) >= CVS_REACHED_AT for k in labels) for c in before)
    return out


def case_record(case_dir: Path) -> dict[str, Any]:
    """One case's figures, from its replay outputs."""
    s = json.loads((case_dir / "summary.json").read_text())
    timeline = json.loads((case_dir / "timeline.json").read_text())
    spans = _spans(timeline["rows"], s["duration_s"])
    durations: dict[str, float] = {}
    for r, span in spans:
        if r["phase"]:
            durations[r["phase"]] = durations.get(r["phase"], 0.0) + span
    raised = [a for a in s["alerts"] if a["event"] == "raised"]
    by_rule: dict[str, int] = {}
    for a in raised:
        by_rule[a["rule"]] = by_rule.get(a["rule"], 0) + 1
    record: dict[str, Any] = {
        "case_id": case_dir.name, "video": s["video"], "frames": s["frames"], "duration_s": round(s["duration_s"], 3),
        "complete": s["complete"], "model_set": s.get("model_set", {}),
        "models": {name: m["version"] for name, m in s["models"].items()},
        "phase_durations_s": {p: round(durations[p], 3) for p in PHASES if p in durations},
        "alerts_by_rule": by_rule,
        "alerts_by_severity": {sev: sum(a["severity"] == sev for a in raised) for sev in SEVERITIES},
        "cvs_before_clipping": _cvs_before_clipping(sorted(timeline["rows"], key=lambda r: r["frame"])),
        "out_of_body_s": round(s["out_of_body_frames"] / s["fps"], 3),
        # paused because the scene was not one the models know (replays before that check: none)
        "unfamiliar_scene_s": round(s.get("paused_s", {}).get(PAUSED_UNFAMILIAR, 0.0), 3),
        "low_visibility_s": round(sum(span for r, span in spans if r["low_visibility"] and not r["out_of_body"]), 3),
        "phase_unsure_s": round(sum(span for r, span in spans
                                    if r["phase"] and not r["out_of_body"] and not r.get("ai_paused")
                                    and r["confidence"] < UNSURE_BELOW), 3),
    }
    ph = s.get("phase_metrics")
    if ph:
        record["labelled_frames"] = sum(m["frames"] for m in ph["strict"]["per_phase"].values())
        for name in ("strict", "official"):
            scores = ph.get(name)  # no official figures where the phase model's labels are not Cholec80's
            means = mean_over_phases(scores["per_phase"]) if scores else {}
            record[f"{name}_accuracy"] = scores["accuracy"] if scores else None
            for key in ("jaccard", "precision", "recall"):
                record[f"{name}_{key}"] = figure(means.get(key))
    return record


def _distribution(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]  # nearest rank
    return {"cases": len(ordered), "median_s": round(statistics.median(ordered), 3), "p90_s": round(p90, 3),
            "max_s": round(ordered[-1], 3)}


def _mean_sd(values: list[float]) -> dict[str, float | None]:
    return {"mean": figure(statistics.fmean(values)) if values else None,
            "sd": figure(statistics.stdev(values)) if len(values) > 1 else None}


def cohort(cases: list[dict], failures: list[dict]) -> dict[str, Any]:
    """Every cohort figure, from the case records."""
    phases = {}
    for p in PHASES:
        values = [c["phase_durations_s"][p] for c in cases if p in c["phase_durations_s"]]
        ref = PHASE_DURATIONS[p]
        phases[p] = {"cohort": _distribution(values) if values else None,
                     "cholec80": {"videos": ref.videos_with_phase, "median_s": ref.median_s, "p90_s": ref.p90_s,
                                  "max_s": ref.max_s},
                     "beyond_cholec80_p90": [c["case_id"] for c in cases if c["phase_durations_s"].get(p, 0) > ref.p90_s]}
    rules: dict[str, dict] = {}
    for c in cases:
        for rule, n in c["alerts_by_rule"].items():
            r = rules.setdefault(rule, {"raised": 0, "cases": 0})
            r["raised"] += n
            r["cases"] += 1
    with_cvs = [c for c in cases if c["cvs_before_clipping"] is not None]
    criteria = sorted({k for c in with_cvs for k in c["cvs_before_clipping"]})
    labelled = [c for c in cases if "strict_accuracy" in c]
    metrics: dict[str, Any] = {"cases": len(labelled)}
    for name in ("strict", "official"):
        scored = [c for c in labelled if c[f"{name}_accuracy"] is not None]
        frames = sum(c["labelled_frames"] for c in scored)
        metrics[name] = {k: _mean_sd([c[f"{name}_{k}"] for c in scored if c[f"{name}_{k}"] is not None])
                         for k in ("accuracy", "precision", "recall", "jaccard")}
        metrics[name]["accuracy_pooled"] = (figure(sum(c[f"{name}_accuracy"] * c["labelled_frames"] for c in scored)
                                                   / frames) if frames else None)
    versions: dict[str, dict[str, int]] = {}
    for c in cases:
        for model, version in c["models"].items():
            versions.setdefault(model, {})[version] = versions.setdefault(model, {}).get(version, 0) + 1
    sets: dict[str, int] = {}
    for c in cases:
        label = f"{c['model_set'].get('name', '?')} {c['model_set'].get('version', '?')}"
        sets[label] = sets.get(label, 0) + 1
    return {
        "cases": len(cases), "failed": failures, "incomplete": [c["case_id"] for c in cases if not c["complete"]],
        "model_sets": sets, "model_versions": versions,
        "phase_durations": phases,
        "alerts": {"by_rule": rules, "by_severity": {s: sum(c["alerts_by_severity"][s] for c in cases) for s in SEVERITIES},
                   "per_case_mean": round(statistics.fmean(sum(c["alerts_by_rule"].values()) for c in cases), 4)},
        "cvs_before_clipping": ({"cases": len(with_cvs),
                                 "reached": {k: sum(c["cvs_before_clipping"][k] for c in with_cvs) for k in criteria}}
                                if with_cvs else None),
        "paused_s": {"out_of_body": round(sum(c["out_of_body_s"] for c in cases), 3),
                     "unfamiliar_scene": round(sum(c["unfamiliar_scene_s"] for c in cases), 3),
                     "low_visibility": round(sum(c["low_visibility_s"] for c in cases), 3)},
        "phase_unsure_s": round(sum(c["phase_unsure_s"] for c in cases), 3),
        "phase_metrics": metrics if labelled else None,
        "per_case": cases,
    }


CSV_FIXED = ("case_id", "video", "frames", "duration_s", "complete", "out_of_body_s", "unfamiliar_scene_s", "low_visibility_s",
             "phase_unsure_s", "strict_accuracy", "official_accuracy", "strict_jaccard", "official_jaccard")


def cases_csv(cases: list[dict]) -> str:
    rules = sorted({r for c in cases for r in c["alerts_by_rule"]})
    criteria = sorted({k for c in cases for k in (c["cvs_before_clipping"] or {})})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_FIXED, *(f"duration_s_{p}" for p in PHASES), *(f"alerts_{s}" for s in SEVERITIES),
                *(f"alerts_rule_{r}" for r in rules), *(f"before_clipping_{k}" for k in criteria)])
    for c in cases:
        cvs = c["cvs_before_clipping"] or {}
        w.writerow([*("" if c.get(k) is None else c[k] for k in CSV_FIXED),
                    *(c["phase_durations_s"].get(p, "") for p in PHASES),
                    *(c["alerts_by_severity"][s] for s in SEVERITIES), *(c["alerts_by_rule"].get(r, 0) for r in rules),
                    *(int(cvs[k]) if k in cvs else "" for k in criteria)])
    return buf.getvalue()


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> dict[str, str]:
    """The figures as base64 PNG: phase durations beside Cholec80, and alerts per case by severity."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("archive report needs matplotlib: pip install 'or-agent[archive]'") from None
    cases = report["per_case"]
    fig, ax = plt.subplots(figsize=(10, 5))
    data = [[c["phase_durations_s"][p] / 60 for c in cases if p in c["phase_durations_s"]] for p in PHASES]
    positions = [i for i, d in enumerate(data) if d]
    if positions:
        ax.boxplot([data[i] for i in positions], positions=[i - 0.18 for i in positions], widths=0.3, orientation="horizontal",
                   patch_artist=True, boxprops={"facecolor": "#9ecae1"}, manage_ticks=False)
    ref = [PHASE_DURATIONS[p] for p in PHASES]
    y = [i + 0.18 for i in range(len(PHASES))]
    ax.hlines(y, [r.median_s / 60 for r in ref], [r.p90_s / 60 for r in ref], colors="#d62728")
    ax.plot([r.median_s / 60 for r in ref], y, "D", color="#d62728", label="Cholec80 median")
    ax.plot([r.p90_s / 60 for r in ref], y, ">", color="#d62728", label="Cholec80 90th percentile")
    ax.plot([r.max_s / 60 for r in ref], y, "x", color="#d62728", label="Cholec80 maximum")
    ax.set_yticks(range(len(PHASES)), PHASES)
    ax.invert_yaxis()
    ax.set_xlabel("duration (min, media time); boxes: this cohort")
    ax.legend(loc="lower right", fontsize=8)
    plots = {"durations": _png(fig)}
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ids = [c["case_id"] for c in cases]
    bottom = [0] * len(cases)
    for sev, colour in zip(SEVERITIES, ("#d62728", "#ff7f0e", "#1f77b4")):
        counts = [c["alerts_by_severity"][sev] for c in cases]
        ax.bar(range(len(ids)), counts, bottom=bottom, color=colour, label=sev)
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set_xticks(range(len(ids)), ids, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("alerts raised")
    ax.legend(fontsize=8)
    plots["alerts"] = _png(fig)
    plt.close(fig)
    return plots


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if c is None else str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cohort_html(report: dict, plots: dict[str, str]) -> str:
    r = report
    parts = [f"<h1>Cohort report: {r['cases']} cases</h1>",
             "<p class='warn'>Reference models trained on synthetic data: not for clinical use.</p>",
             _table(["model set", "cases"], list(r["model_sets"].items())),
             _table(["model", "version: cases"], [[m, ", ".join(f"{v}: {n}" for v, n in vs.items())]
                                                  for m, vs in r["model_versions"].items()])]
    if r["failed"]:
        parts.append("<h2>Failed cases</h2>" + _table(["case", "video", "attempts", "error"],
                                                      [[f["case_id"], f["video"], f["attempts"], f["error"]] for f in r["failed"]]))
    parts.append("<h2>Phase durations</h2><p>Boxes: this cohort (media time); red: Cholec80.</p>"
                 f"<img alt='phase durations' src='data:image/png;base64,{plots['durations']}'>")
    parts.append(_table(["phase", "cases", "median s", "p90 s", "max s", "Cholec80 median s", "Cholec80 p90 s",
                         "beyond Cholec80 p90"],
                        [[p, *((d["cohort"] or {}).get(k) for k in ("cases", "median_s", "p90_s", "max_s")),
                          d["cholec80"]["median_s"], d["cholec80"]["p90_s"], ", ".join(d["beyond_cholec80_p90"]) or "none"]
                         for p, d in r["phase_durations"].items()]))
    parts.append(f"<h2>Alerts</h2><p>{r['alerts']['per_case_mean']:g} raised per case on average.</p>"
                 f"<img alt='alerts per case' src='data:image/png;base64,{plots['alerts']}'>")
    parts.append(_table(["rule", "raised", "cases"], [[k, v["raised"], v["cases"]] for k, v in r["alerts"]["by_rule"].items()]))
    cvs = r["cvs_before_clipping"]
    parts.append("<h2>Critical View of Safety before clipping</h2>" + (
        _table(["criterion", f"cases reaching it before clipping (of {cvs['cases']})"], list(cvs["reached"].items()))
        if cvs else "<p>The model set assesses no CVS criteria, or no case reached clipping.</p>"))
    parts.append("<h2>Paused and unsure</h2>" + _table(
        ["out of body", "unfamiliar scene", "low visibility", "phase model unsure"],
        [[f"{r['paused_s']['out_of_body']:.1f} s", f"{r['paused_s']['unfamiliar_scene']:.1f} s",
          f"{r['paused_s']['low_visibility']:.1f} s", f"{r['phase_unsure_s']:.1f} s"]]))
    pm = r["phase_metrics"]
    if pm:
        parts.append(f"<h2>Phase recognition against labels ({pm['cases']} cases)</h2><p>Strict: frame by frame. "
                     "Official: the Cholec80 evaluation (Evaluate.m: in the first 10 s of each labelled phase the "
                     "previous phase counts as right, in its last 10 s the next). Mean and sd over cases, and accuracy "
                     "pooled over all labelled frames.</p>")
        parts.append(_table(["figures", "accuracy", "accuracy pooled", "precision", "recall", "Jaccard"],
                            [[n, *(f"{pm[n][k]['mean']} ± {pm[n][k]['sd']}" if k != "accuracy_pooled" else pm[n][k]
                                   for k in ("accuracy", "accuracy_pooled", "precision", "recall", "jaccard"))]
                             for n in ("strict", "official")]))
    parts.append("<h2>Cases</h2>" + _table(
        ["case", "duration s", "alerts", "out of body s", "strict accuracy", "official accuracy", "complete"],
        [[c["case_id"], c["duration_s"], sum(c["alerts_by_rule"].values()), c["out_of_body_s"], c.get("strict_accuracy"),
          c.get("official_accuracy"), c["complete"]] for c in r["per_case"]]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right} th{background:#eee}"
             "td:first-child{text-align:left} img{max-width:100%} .warn{color:#a00}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Cohort report</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_cohort_report(archive_dir: str | Path, out: str | Path | None = None) -> dict:
    """Read the completed cases under ``archive_dir``; write cohort.json, cases.csv and cohort.html into
    ``out`` (default: the archive folder). Returns the report."""
    root = Path(archive_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such archive folder")
    case_dirs = sorted(p.parent for p in root.glob(f"*/{DONE_FILE}"))
    if not case_dirs:
        raise InputError(f"{root}: no completed case (no <case>/{DONE_FILE}): run `or-agent archive run` into it first")
    cases = []
    for d in case_dirs:
        try:
            cases.append(case_record(d))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{d}: cannot read its replay outputs ({type(exc).__name__}: {exc})") from None
    try:
        failures = json.loads((root / FAILURES_FILE).read_text()).get("failures", [])
    except (OSError, ValueError, AttributeError):
        failures = []
    report = cohort(cases, failures)
    dest = make_output_dir(out) if out else root
    plots = _plots(report)
    atomic_write_text(dest / "cohort.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(dest / "cases.csv", cases_csv(cases))
    atomic_write_bytes(dest / "cohort.html", cohort_html(report, plots).encode())
    return report
