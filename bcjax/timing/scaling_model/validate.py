"""``validate``: the model against published tables; ``fit``: re-derive its fitted part.

validate writes DIR/validation.csv (every input row; one it cannot predict says why in
``limit`` and ``reason``), DIR/summary.md (out-of-sample errors first: leave one source out,
leave one GPU generation out, and rows whose source the shipped fit never saw; per group n,
model MAE, naive MAE, largest error and interval coverage; in-sample after) and
DIR/predicted_vs_published.png.
"""

from __future__ import annotations

import csv
import pathlib
from collections import defaultdict

from bcjax.timing.scaling_model import fitting
from bcjax.timing.scaling_model.fitted import FITTED_PATH, INTERVAL_LEVEL, SHIPPED, ModelParams
from bcjax.timing.scaling_model.published import (
    SUPERLINEAR,
    predict_case,
    prepare,
    read_published,
)

COLUMNS = (
    "table_id",
    "source",
    "framework",
    "model",
    "gpu",
    "gpus",
    "batch_per_gpu",
    "precision",
    "interconnect",
    "data_source",
    "params",
    "scheme",
    "published_images_per_s",
    "published_efficiency",
    "predicted_images_per_s",
    "predicted_efficiency",
    "error",
    "naive_error",
    "interval_low",
    "interval_high",
    "limit",
    "loso_predicted_efficiency",
    "loso_error",
    "compute_ms",
    "exposed_comm_ms",
    "sync_ms",
    "contention_ms",
    "board_ms",
    "assumptions",
    "reason",
)


def source_label(case: dict) -> str:
    return case["source"]


def hardware_label(case: dict) -> str:
    return case["generation"]


def group_label(case: dict) -> str:
    """Framework family and communication scheme: the summary's groups (and the intervals')."""
    return fitting.interval_group(case)


def _records(cases, params, loso) -> list[dict]:
    out = []
    for case in cases:
        r = case["row"]
        rec = {k: r.get(k, "") for k in COLUMNS}
        rec["source"] = case["source"]
        rec["params"] = case.get("params", r.get("params", ""))
        rec["published_images_per_s"] = r.get("images_per_s", "")
        if "published_efficiency" in case:
            rec["published_efficiency"] = round(case["published_efficiency"], 4)
        pred = predict_case(case, params)
        if pred is None:
            rec["limit"] = f"not predicted: {case['reason']}"
        else:
            low, high = fitting.interval(
                pred["efficiency"], params.residual_quantiles, group_label(case)
            )
            rec.update(
                scheme=case["scheme"].name,
                predicted_images_per_s=round(pred["images_per_s"], 1),
                predicted_efficiency=round(pred["efficiency"], 4),
                error=round(pred["efficiency"] - case["published_efficiency"], 4),
                naive_error=round(1.0 - case["published_efficiency"], 4),
                interval_low=round(low, 4),
                interval_high=round(high, 4),
                limit=pred["limit"],
                compute_ms=round(pred["compute_s"] * 1e3, 2),
                exposed_comm_ms=round(pred["exposed_collective_s"] * 1e3, 3),
                sync_ms=round(pred["sync_s"] * 1e3, 2),
                contention_ms=round(pred["contention_s"] * 1e3, 2),
                board_ms=round(pred["board_s"] * 1e3, 2),
            )
            case["assumptions"].append(f"scheme {case['scheme'].name} ({case['scheme_why']})")
            case["assumptions"].append(f"host contention from {pred['contention_from']}")
            if id(case) in loso:
                value = loso[id(case)]["efficiency"]
                rec["loso_predicted_efficiency"] = round(value, 4)
                rec["loso_error"] = round(value - case["published_efficiency"], 4)
        rec["assumptions"] = "; ".join(dict.fromkeys(case["assumptions"]))
        rec["reason"] = case["reason"] or case.get("unmatchable", "")
        rec["_case"] = case
        out.append(rec)
    return out


def _nested_intervals(cases, predictions, label, pooled) -> dict[int, tuple[float, float]]:
    """Each out-of-sample prediction's interval from the errors of the *other* labels' rows
    only (``pooled``: every out-of-sample prediction set, as the shipped intervals pool
    them), so that coverage is itself out of sample."""
    out = {}
    cases = [c for c in cases if not c["reason"]]
    for name in sorted({label(c) for c in cases if id(c) in predictions}):
        others = [c for c in cases if label(c) != name]
        quantiles = fitting.residual_quantiles(others, *pooled)
        for c in cases:
            if label(c) == name and id(c) in predictions:
                out[id(c)] = fitting.interval(
                    predictions[id(c)]["efficiency"], quantiles, group_label(c)
                )
    return out


def _table(title, cases, predictions, intervals, label=group_label) -> list[str]:
    groups = defaultdict(list)
    for c in fitting.fittable(cases):
        if id(c) in predictions:
            groups["all rows"].append(c)
            groups[label(c)].append(c)
    if not groups:
        return [f"**{title}**: no row.", ""]
    lines = [
        f"**{title}**",
        "",
        "| rows | n | model MAE | naive MAE | model max | coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in sorted(groups.items(), key=lambda kv: (kv[0] != "all rows", kv[0])):
        errors = [abs(predictions[id(c)]["efficiency"] - c["published_efficiency"]) for c in rows]
        naive = [abs(1.0 - c["published_efficiency"]) for c in rows]
        inside = [
            intervals[id(c)][0] - 1e-9 <= c["published_efficiency"] <= intervals[id(c)][1] + 1e-9
            for c in rows
            if id(c) in intervals
        ]
        coverage = f"{100 * sum(inside) / len(inside):.0f}%" if inside else "–"
        lines.append(
            f"| {name} | {len(rows)} | {100 * sum(errors) / len(rows):.1f} | "
            f"{100 * sum(naive) / len(rows):.1f} | {100 * max(errors):.1f} | {coverage} |"
        )
    return lines + [""]


def _coverage_by_source(cases, intervals) -> list[str]:
    """One line: the coverage of each source document's own rows, left out, as a spread. The
    intervals aim at 80% of a new source's rows on average; residuals correlate within a
    source, so one source can land far from it either way."""
    by_source = defaultdict(list)
    for c in fitting.fittable(cases):
        if id(c) in intervals:
            low, high = intervals[id(c)]
            by_source[source_label(c)].append(
                low - 1e-9 <= c["published_efficiency"] <= high + 1e-9
            )
    if len(by_source) < 2:
        return []
    shares = sorted(100 * sum(v) / len(v) for v in by_source.values())
    return [
        f"Coverage of each source document's own rows, left out: {shares[0]:.0f}% to "
        f"{shares[-1]:.0f}% over {len(shares)} sources (mean {sum(shares) / len(shares):.0f}%; "
        "a single new source can land anywhere in such a spread).",
        "",
    ]


def _figures(cases, predictions, intervals) -> dict:
    rows = [c for c in fitting.fittable(cases) if id(c) in predictions]
    errors = [abs(predictions[id(c)]["efficiency"] - c["published_efficiency"]) for c in rows]
    inside = [
        intervals[id(c)][0] - 1e-9 <= c["published_efficiency"] <= intervals[id(c)][1] + 1e-9
        for c in rows
    ]
    count = max(len(rows), 1)  # no predictable row: zeros, not a crash
    return {
        "rows": len(rows),
        "mae": 100 * sum(errors) / count,
        "naive_mae": 100 * sum(abs(1 - c["published_efficiency"]) for c in rows) / count,
        "coverage": 100 * sum(inside) / count,
        "predictions": predictions,
        "intervals": intervals,
    }


def out_of_sample_figures(cases: list[dict]) -> dict:
    """MAE, naive MAE (points) and interval coverage leaving one source out ('source') and
    leaving one GPU generation out ('generation'), for tests and the summary alike. The
    intervals pool both kinds of out-of-sample errors of the other labels' rows."""
    by_source = fitting.out_of_sample(cases, source_label)
    by_generation = fitting.out_of_sample(cases, hardware_label)
    pooled = (by_source, by_generation)
    return {
        "source": _figures(
            cases, by_source, _nested_intervals(cases, by_source, source_label, pooled)
        ),
        "generation": _figures(
            cases, by_generation, _nested_intervals(cases, by_generation, hardware_label, pooled)
        ),
    }


def summary_markdown(records, cases, params: ModelParams, source: str, loso, hardware) -> str:
    predicted = [r for r in records if r["predicted_efficiency"] != ""]
    nominal = f"{INTERVAL_LEVEL:.0%}"
    lines = [
        f"# Scaling model against {source}",
        "",
        "Efficiency = throughput(N) / (N x throughput(1)) within each series (table_id), "
        "from the series' own 1-GPU row. Errors in points of efficiency; naive = the linear "
        f"guess (efficiency 1). Coverage: share of rows whose published efficiency lies in "
        f"their {nominal} interval (nominal {nominal}); an interval is the prediction minus "
        "the 10th and 90th percentiles of out-of-sample errors (leaving sources out and "
        "leaving GPU generations out, pooled), the wider of those of the row's framework / "
        "scheme group and those of all rows, and the coverage below is nested: a left-out "
        "row's interval comes from the other rows' errors only. Rows with published "
        f"efficiency above {SUPERLINEAR} are listed below, kept in validation.csv with their "
        "error, and left out of the MAE in the tables (no data-parallel term gives them); "
        "the MAE with them is stated after the tables.",
        "",
        f"Fitted: {params.count()} numbers (sync_cv, node_sync_cv, "
        f"{len(params.contention) + len(params.pooled_contention)} host-contention fractions, "
        f"the dual-GPU board loss, {2 * len(params.residual_quantiles)} interval quantiles "
        f"({len(params.residual_quantiles)} groups of errors)) on {params.rows} rows from "
        f"{len(params.sources)} source documents.",
        "",
        "## Out of sample",
        "",
    ]
    unseen = [c for c in cases if not c["reason"] and c["source"] not in params.sources]
    if unseen:
        shipped = {id(c): predict_case(c, params) for c in unseen}
        intervals = {
            id(c): fitting.interval(
                shipped[id(c)]["efficiency"], params.residual_quantiles, group_label(c)
            )
            for c in unseen
        }
        for title, label in (
            (
                "Rows whose source the shipped fit never saw (shipped parameters and intervals)",
                None,
            ),
            ("… the same rows by source document", source_label),
            ("… by interconnect as the model read it", lambda c: c["link"].name),
        ):
            if label is None:
                lines += _table(title, unseen, shipped, intervals)
            else:
                lines += _table(title, unseen, shipped, intervals, label)
    for title, (predictions, intervals) in (
        ("Leave one source document out (refit on this file's other sources)", loso),
        ("Leave one GPU generation out (refit on this file's other generations)", hardware),
    ):
        lines += _table(title, cases, predictions, intervals)
        if predictions is loso[0]:
            lines += _coverage_by_source(cases, intervals)
    shipped_all = {id(c): predict_case(c, params) for c in cases if not c["reason"]}
    shipped_intervals = {
        i: (r["interval_low"], r["interval_high"]) for r in predicted for i in [id(r["_case"])]
    }
    lines += ["## In sample (shipped parameters; the fit saw these rows' sources)", ""]
    seen = [c for c in cases if not c["reason"] and c["source"] in params.sources]
    lines += _table("Shipped fit", seen, shipped_all, shipped_intervals)
    limits = defaultdict(int)
    for r in predicted:
        limits[r["limit"]] += 1
    lines += [
        "Limit named by the model: " + ", ".join(f"{k} {v}" for k, v in sorted(limits.items())),
        "",
        "Largest out-of-sample errors (leave one source out):",
        "",
        "| table | framework / model | gpu | GPUs | published | predicted (LOSO) | limit |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = sorted(
        (r for r in predicted if r["loso_error"] != "" and not r["_case"].get("unmatchable")),
        key=lambda r: -abs(r["loso_error"]),
    )[:12]
    lines += [
        f"| {r['table_id']} | {r['framework']} / {r['model'][:28]} | {r['gpu'][:30]} | "
        f"{r['gpus']} | {r['published_efficiency']:.3f} | "
        f"{r['loso_predicted_efficiency']:.3f} | {r['limit']} |"
        for r in worst
    ]
    odd = [r for r in predicted if r["_case"].get("unmatchable")]
    if odd:
        with_odd = [r for r in predicted if r["loso_error"] != ""]
        lines += [
            "",
            f"Published efficiency above {SUPERLINEAR} (kept, not in the MAE): with these "
            f"{len(odd)} rows included, leave one source out gives MAE "
            f"{100 * sum(abs(r['loso_error']) for r in with_odd) / len(with_odd):.1f} points "
            f"(naive {100 * sum(abs(r['naive_error']) for r in with_odd) / len(with_odd):.1f}) "
            f"on {len(with_odd)} rows.",
            "",
        ]
        lines += [
            f"- table {r['table_id']} ({r['framework']} / {r['model']}), {r['gpus']} GPUs: "
            f"published {r['published_efficiency']:.2f}, predicted {r['predicted_efficiency']:.2f}"
            for r in odd
        ]
    reasons = defaultdict(int)
    for r in records:
        if r["predicted_efficiency"] == "":
            reasons[r["reason"]] += 1
    lines += ["", "Not predicted (kept in validation.csv, the reason in `limit`):", ""]
    lines += [f"- {n} rows: {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1])]
    lines += [
        "",
        f"Parameters: sync_cv {params.sync_cv}, node_sync_cv {params.node_sync_cv}, dual-GPU "
        f"board loss {params.board_loss}; host "
        "contention (share of compute a full host loses) by family/input/precision (and "
        "model family, for a family whose rows are all of one): "
        + (", ".join(f"{'/'.join(k)} {v}" for k, v in params.contention) or "none")
        + "; pooled by input/precision: "
        + (", ".join(f"{'/'.join(k)} {v}" for k, v in params.pooled_contention) or "none")
        + "; interval error quantiles (q10, q90, out-of-sample errors pooled; a row takes "
        "the wider of its group's and all's): "
        + ", ".join(f"{k} {v}" for k, v in params.residual_quantiles),
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
            s=14,
            label=name,
            alpha=0.8,
        )
    ax.plot([0.5, 1.1], [0.5, 1.1], "k-", lw=0.8, label="predicted = published")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8, label="naive (linear)")
    ax.set(
        xlim=(0.5, 1.1),
        ylim=(0.5, 1.1),
        xlabel="published efficiency",
        ylabel="predicted efficiency (shipped fit)",
        title="Scaling model vs published tables",
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate(
    published,
    out: str,
    *,
    bus_bandwidth: float | None = None,
    params: ModelParams = SHIPPED,
) -> list[dict]:
    """``published``: one CSV path or several."""
    paths = [published] if isinstance(published, (str, pathlib.Path)) else list(published)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_published(*paths)
    print(f"{', '.join(map(str, paths))}: {len(rows)} rows")
    cases = prepare(rows, bus_bandwidth=bus_bandwidth)
    figures = out_of_sample_figures(cases)
    loso_figures = figures["source"]
    loso = (loso_figures["predictions"], loso_figures["intervals"])
    hardware = (figures["generation"]["predictions"], figures["generation"]["intervals"])
    records = _records(cases, params, loso[0])
    with open(out_dir / "validation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    name = ", ".join(pathlib.Path(p).name for p in paths)
    (out_dir / "summary.md").write_text(
        summary_markdown(records, cases, params, name, loso, hardware)
    )
    plot(records, out_dir / "predicted_vs_published.png")
    done = sum(r["predicted_efficiency"] != "" for r in records)
    print(
        f"predicted {done} rows, {len(records) - done} not predicted (see limit); leave one "
        f"source out: MAE {loso_figures['mae']:.1f} points (naive {loso_figures['naive_mae']:.1f}) "
        f"on {loso_figures['rows']} rows; wrote {out_dir}/validation.csv, summary.md, "
        "predicted_vs_published.png"
    )
    return records


def fit_report(published, out: str, *, write: bool = False) -> str:
    """Fit on every fittable row (with interval quantiles from leaving each source out);
    compare with the shipped fitted.json; ``write`` replaces it."""
    paths = [published] if isinstance(published, (str, pathlib.Path)) else list(published)
    cases = prepare(read_published(*paths))
    params = fitting.fit_with_intervals(cases, source_label, hardware_label)
    same = params == SHIPPED
    lines = [
        "# Fitted parameters",
        "",
        f"{params.count()} numbers fitted on {params.rows} rows (published efficiency <= "
        f"{SUPERLINEAR}) from {len(params.sources)} sources; "
        + ("identical to the shipped fitted.json." if same else "differ from the shipped file."),
        "",
        "```json",
        params.to_json().rstrip(),
        "```",
    ]
    if write:
        FITTED_PATH.write_text(params.to_json())
        lines.append(f"\nwrote {FITTED_PATH.name}")
    text = "\n".join(lines) + "\n"
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "fit.md").write_text(text)
    return text
