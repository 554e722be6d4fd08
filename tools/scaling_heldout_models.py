"""The scaling model on models it was never fitted on: leave one model out.

For each model in the shared published tables (ResNet-50, ResNeXt-101, EfficientNet-B0 ...),
refit the model's fitted numbers on every other model's rows and predict this model's rows.
The EfficientNet-WideSE rows, whose parameter count no source prints, are given their base
model's count (B0 5,288,548, B4 19,341,616, as the shared file prints for the base models),
a stated approximation: the count only sizes the all-reduce (under 1% of these steps).

    python tools/scaling_heldout_models.py --out results/scaling_validation/heldout_models
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections import defaultdict

from bcjax.timing.scaling_model import fitting, published

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
WIDESE_BASE_PARAMS = {"efficientnet-widese-b0": 5_288_548, "efficientnet-widese-b4": 19_341_616}


def model_label(case: dict) -> str:
    """The model's name without its parenthesised notes, lower case."""
    return re.split(r"[(\[]", case["row"].get("model", ""))[0].strip().lower()


def heldout_cases(paths) -> list[dict]:
    rows = published.read_published(*paths)
    for r in rows:
        if not r.get("params") and r.get("model") in WIDESE_BASE_PARAMS:
            r["params"] = str(WIDESE_BASE_PARAMS[r["model"]])
    return published.prepare(rows)


def leave_one_model_out(cases: list[dict]) -> list[tuple[str, int, float, float, float]]:
    """(model, rows, model MAE, naive MAE, max error) in points, plus an 'all' line."""
    predictions = fitting.out_of_sample(cases, model_label)
    groups = defaultdict(list)
    for c in fitting.fittable(cases):
        error = abs(predictions[id(c)]["efficiency"] - c["published_efficiency"])
        naive = abs(1 - c["published_efficiency"])
        groups[model_label(c)].append((error, naive))
        groups["all"].append((error, naive))
    return [
        (
            name,
            len(v),
            100 * sum(e for e, _ in v) / len(v),
            100 * sum(n for _, n in v) / len(v),
            100 * max(e for e, _ in v),
        )
        for name, v in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0]))
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--published",
        nargs="+",
        default=[DATA / "published_scaling.csv", DATA / "tf_cnn_benchmarks_2017.csv"],
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    table = leave_one_model_out(heldout_cases(args.published))
    lines = [
        "# Scaling model on models it was never fitted on (leave one model out)",
        "",
        "Refit without the model's rows, predict them; efficiency points. EfficientNet-WideSE "
        "rows carry their base model's parameter count (stated approximation).",
        "",
        "| model | rows | model MAE | naive MAE | max error |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {n} | {mae:.1f} | {naive:.1f} | {worst:.1f} |"
        for m, n, mae, naive, worst in table
    ]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
