"""``validate``: the model against a published table; ``fit``: re-derive its fitted part.

validate writes DIR/validation.csv (every row of the input, the ones that cannot be
predicted with their ``reason``), DIR/summary.md (mean and max absolute error per
framework/model group beside the naive "linear scaling" guess) and DIR/predicted_vs_published.png.
"""

from __future__ import annotations

import csv
import pathlib
from collections import defaultdict

from bcjax.timing.scaling_model import fitting, presets
from bcjax.timing.scaling_model.published import (
    SUPERLINEAR,
    ModelParams,
    predict_case,
    prepare,
    read_published,
)

COLUMNS = (
    "table_id",
    "framework",
    "model",
    "gpu",
    "gpus",
    "batch_per_gpu",
    "precision",
    "interconnect",
    "data_source",
    "params",
    "published_images_per_s",
    "published_efficiency",
    "predicted_images_per_s",
    "predicted_efficiency",
    "error",
    "naive_error",
    "limit",
    "compute_ms",
    "exposed_allreduce_ms",
    "sync_ms",
    "contention_ms",
    "input_ceiling_images_per_s",
    "assumptions",
    "reason",
)


def _records(cases: list[dict], params: ModelParams) -> list[dict]:
    out = []
    for case in cases:
        r = case["row"]
        rec = {k: r.get(k, "") for k in COLUMNS}
        rec["params"] = case.get("params", r.get("params", ""))
        rec["published_images_per_s"] = r.get("images_per_s", "")
        if "published_efficiency" in case:
            rec["published_efficiency"] = round(case["published_efficiency"], 4)
        pred = predict_case(case, params)
        ceiling = None
        if pred is not None:
            ceiling = params.ceiling(case["pipeline"], case["loader"], case["host"])
            rec.update(
                predicted_images_per_s=round(pred["images_per_s"], 1),
                predicted_efficiency=round(pred["efficiency"], 4),
                error=round(pred["efficiency"] - case["published_efficiency"], 4),
                naive_error=round(1.0 - case["published_efficiency"], 4),
                limit=pred["limit"],
                compute_ms=round(pred["compute_s"] * 1e3, 2),
                exposed_allreduce_ms=round(pred["exposed_collective_s"] * 1e3, 3),
                sync_ms=round(pred["sync_s"] * 1e3, 2),
                contention_ms=round(pred["contention_s"] * 1e3, 2),
                input_ceiling_images_per_s=ceiling or "",
            )
        notes = list(case["assumptions"])
        cpu_bound_possible = case.get("host") and case.get("loader") in presets.CPU_LOADERS
        if pred is not None and ceiling is None and cpu_bound_possible:
            notes.append(f"no input ceiling fitted for {case['pipeline']} on {case['host']}")
        rec["assumptions"] = "; ".join(notes)
        rec["reason"] = case["reason"] or case.get("unmatchable", "")
        rec["_case"] = case
        out.append(rec)
    return out


def _stats(recs: list[dict], key: str) -> tuple[float, float]:
    errors = [abs(r[key]) * 100 for r in recs]
    return sum(errors) / len(errors), max(errors)


def _line(name: str, recs: list[dict]) -> str:
    mae, worst = _stats(recs, "error")
    naive_mae, naive_worst = _stats(recs, "naive_error")
    return (
        f"| {name} | {len(recs)} | {mae:.1f} | {worst:.1f} | {naive_mae:.1f} | {naive_worst:.1f} |"
    )


def summary_markdown(records: list[dict], params: ModelParams, source: str) -> str:
    predicted = [r for r in records if r["predicted_efficiency"] != ""]
    matchable = [r for r in predicted if not r["_case"].get("unmatchable")]
    head = [
        "| rows | n | model MAE | model max | naive MAE | naive max |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        f"# Scaling model against {source}",
        "",
        "Efficiency = throughput(N) / (N x throughput(1)), from each series' 1-GPU row. "
        "Errors in points of efficiency (model: predicted - published; naive: the linear "
        "guess, efficiency 1). Max = largest absolute error.",
        "",
    ]
    if not predicted:
        return "\n".join(lines + ["No row could be predicted."])
    lines += head + [_line("all predicted rows", predicted)]
    if len(matchable) < len(predicted):
        lines.append(_line(f"without published efficiency > {SUPERLINEAR}", matchable))
    fit_rows = [r for r in predicted if fitting.in_fit_subset(r["_case"])]
    if 0 < len(fit_rows) < len(predicted):
        lines.append(_line("notes without HISTORICAL (the declared fit rule)", fit_rows))
        lines.append(_line("HISTORICAL tables", [r for r in predicted if r not in fit_rows]))
    lines += ["", "Per framework / model:", ""] + head
    groups = defaultdict(list)
    for r in predicted:
        groups[f"{r['framework']} / {r['model']}"].append(r)
    lines += [_line(name, recs) for name, recs in sorted(groups.items())]
    lines += ["", "Per GPU count:", ""] + head
    by_n = defaultdict(list)
    for r in predicted:
        by_n[int(r["_case"]["gpus"])].append(r)
    lines += [_line(f"{n} GPUs", recs) for n, recs in sorted(by_n.items())]
    limits = defaultdict(int)
    for r in predicted:
        limits[r["limit"]] += 1
    lines += [
        "",
        "Limit named by the model: " + ", ".join(f"{k} {v}" for k, v in sorted(limits.items())),
        "",
    ]
    worst = sorted(predicted, key=lambda r: -abs(r["error"]))[:12]
    lines += [
        "Largest errors:",
        "",
        "| table | framework / model | GPUs | published | predicted | limit | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['table_id']} | {r['framework']} / {r['model']} | {r['gpus']} | "
        f"{r['published_efficiency']:.3f} | {r['predicted_efficiency']:.3f} | {r['limit']} | "
        f"{r['reason'] or '–'} |"
        for r in worst
    ]
    peers = [r for r in predicted if r["_case"].get("peer_note")]
    if peers:
        lines += [
            "",
            f"1-GPU rows a faster same-chip peer overrode (compute from the peer, efficiency "
            f"still against the printed figure; presets.PEER_GAP = {presets.PEER_GAP}):",
            "",
        ]
        lines += [
            f"- table {r['table_id']}, {r['gpus']} GPUs: {r['_case']['peer_note']}" for r in peers
        ]
    reasons = defaultdict(int)
    for r in records:
        if r["predicted_efficiency"] == "":
            reasons[r["reason"]] += 1
    lines += ["", "Not predicted (kept in validation.csv with the reason):", ""]
    lines += [f"- {n} rows: {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1])]
    lines += [
        "",
        f"Parameters: sync_cv {params.sync_cv}, node_sync_cv {params.node_sync_cv}; "
        "input ceilings (images/s per host): "
        + (", ".join(f"{p} on {h} {c:,.0f}" for (p, h), c in params.input_ceilings) or "none")
        + "; host contention (fraction of compute, full host): "
        + (", ".join(f"{p} on {h} {f}" for (p, h), f in params.host_contention) or "none"),
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = [r for r in records if r["predicted_efficiency"] != ""]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    by_framework = defaultdict(list)
    for r in predicted:
        by_framework[r["framework"]].append(r)
    for name, recs in sorted(by_framework.items()):
        ax.scatter(
            [r["published_efficiency"] for r in recs],
            [r["predicted_efficiency"] for r in recs],
            s=18,
            label=name,
            alpha=0.8,
        )
    ax.plot([0.5, 1.1], [0.5, 1.1], "k-", lw=0.8, label="predicted = published")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8, label="naive (linear)")
    ax.set(
        xlim=(0.55, 1.1),
        ylim=(0.55, 1.1),
        xlabel="published efficiency",
        ylabel="predicted efficiency",
        title="Scaling model vs published tables",
    )
    off = [r for r in predicted if not 0.55 <= r["published_efficiency"] <= 1.1]
    if off:
        listed = ", ".join(
            f"{r['published_efficiency']:.2f}/{r['predicted_efficiency']:.2f}" for r in off
        )
        ax.text(0.57, 1.07, f"{len(off)} rows off scale (published/predicted {listed})", fontsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate(
    published: str,
    out: str,
    *,
    bus_bandwidth: float | None = None,
    params: ModelParams = ModelParams(),
) -> list[dict]:
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_published(published)
    print(f"{published}: {len(rows)} rows")
    records = _records(prepare(rows, bus_bandwidth=bus_bandwidth), params)
    with open(out_dir / "validation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    (out_dir / "summary.md").write_text(
        summary_markdown(records, params, pathlib.Path(published).name)
    )
    plot(records, out_dir / "predicted_vs_published.png")
    done = sum(r["predicted_efficiency"] != "" for r in records)
    print(
        f"predicted {done} rows, {len(records) - done} not predicted (see reason); wrote "
        f"{out_dir}/validation.csv, summary.md, predicted_vs_published.png"
    )
    return records


def fit_report(published: str, out: str) -> str:
    """Fit on the declared subset, compare with the shipped values, leave-one-out errors."""
    cases = prepare(read_published(published))
    subset = [c for c in cases if fitting.in_fit_subset(c)]
    params = fitting.fit(subset)
    lines = [
        "# Fitted parameters",
        "",
        f"Fit subset: {len(fitting.fittable(subset))} rows (notes without HISTORICAL, "
        f"published efficiency <= {SUPERLINEAR}).",
        "",
        f"- sync_cv: {params.sync_cv} (shipped: {presets.SYNC_CV})",
        f"- node_sync_cv: {params.node_sync_cv} (shipped: {presets.NODE_SYNC_CV})",
    ]
    for key, value in params.host_contention:
        lines.append(
            f"- host contention {key[0]} on {key[1]}: {value} "
            f"(shipped: {presets.HOST_CONTENTION.get(key, 'none')})"
        )
    shipped = presets.INPUT_CEILINGS
    for key, value in params.input_ceilings:
        lines.append(
            f"- input ceiling {key[0]} on {key[1]}: {value:,} images/s "
            f"(shipped: {shipped.get(key, 'none')})"
        )
    for name, label in (
        ("framework", lambda c: c["row"]["framework"]),
        ("source", lambda c: c["row"].get("source_path", "")),
    ):
        loo = fitting.leave_one_out(cases, label)
        rows = sum(x["rows"] for x in loo)
        mae = sum(x["mae"] * x["rows"] for x in loo) / rows
        naive = sum(x["naive_mae"] * x["rows"] for x in loo) / rows
        lines += [
            "",
            f"Leave one {name} out (fit on all other rows, both subsets): {rows} rows, "
            f"MAE {mae * 100:.1f} points (naive {naive * 100:.1f}).",
            "",
            "| left out | rows | MAE | max | naive MAE | sync_cv fitted | node_sync_cv fitted |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['left_out']} | {x['rows']} | {x['mae'] * 100:.1f} | {x['max'] * 100:.1f} | "
            f"{x['naive_mae'] * 100:.1f} | {x['sync_cv']} | {x['node_sync_cv']} |"
            for x in loo
        ]
    text = "\n".join(lines) + "\n"
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "fit.md").write_text(text)
    return text
