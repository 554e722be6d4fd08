"""The clinical sections of a run's report, and their lines in the console report.

`clinical_report` is what a training run (or a cross-validation study, on the
pooled fold ensemble) calls once on its validation and test probabilities;
`grounding.grounding_report` and `probes.probe_report` add the sections that
need images. `format_clinical` renders any of them as a few lines of text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bcjax import report
from bcjax.clinical import bootstrap, calibration, operating_points

__all__ = ["clinical_report", "format_clinical"]


def clinical_report(
    val_probs,
    val_labels,
    test_probs,
    test_labels,
    class_names: Sequence[str],
    *,
    positive_class: str | None = "malignant",
    seed: int = 0,
    resamples: int = bootstrap.RESAMPLES,
    bins: int = calibration.ECE_BINS,
) -> dict[str, Any]:
    """{"calibration", "operating_points", "bootstrap"} for one set of predictions.

    Args:
      val_probs, test_probs: [N, C] class probabilities as the model gives them
        (raw, not temperature-scaled); float64 keeps tiny probabilities finite
        in the log (float32 works too).
      val_labels, test_labels: [N] true class ids.
      class_names: the C class names.
      positive_class: the class of the operating points (vs the rest), e.g.
        bcjax.data.datasets.positive_class(config, names); None leaves
        `operating_points` None and the bootstrap without operating points.
      seed, resamples: the bootstrap's.

    The layout of each section: see calibration.calibration_section,
    operating_points.operating_points_section, bootstrap.bootstrap_section.
    """
    names = list(class_names)
    test_probs = np.asarray(test_probs, np.float64)
    val_probs = np.asarray(val_probs, np.float64)
    if test_probs.ndim != 2 or test_probs.shape[1] != len(names):
        raise ValueError(f"{len(names)} class names for test probabilities {test_probs.shape}")
    points = None
    thresholds: dict[str, float] = {}
    positive_index = None
    if positive_class is not None:  # a name not among class_names is a ValueError
        points = operating_points.operating_points_section(
            val_probs, val_labels, test_probs, test_labels, names, positive_class
        )
        thresholds = operating_points.thresholds_of(points)
        positive_index = names.index(positive_class)
    return {
        "calibration": calibration.calibration_section(
            val_probs, val_labels, test_probs, test_labels, bins
        ),
        "operating_points": points,
        "bootstrap": bootstrap.bootstrap_section(
            test_probs,
            test_labels,
            positive_index=positive_index,
            thresholds=thresholds,
            resamples=resamples,
            seed=seed,
        ),
    }


def _n(x) -> str:
    return report.number(x, 3)


def _ci(entry: Mapping[str, Any] | None, key: str = "value") -> str:
    if not entry or entry.get(key) is None:
        return "–"
    if entry.get("low") is None:
        return _n(entry[key])
    return f"{_n(entry[key])} [{_n(entry['low'])}, {_n(entry['high'])}]"


def format_clinical(sections: Mapping[str, Any]) -> str:
    """A few console lines for each clinical section present in `sections` (a
    results dict or the output of clinical_report, with grounding/probes added)."""
    lines = []
    cal = sections.get("calibration")
    if cal:
        before, after = cal["test"]["before"], cal["test"]["after"]
        lines.append(
            f"calibration (test): ECE {_n(before['ece'])} -> {_n(after['ece'])}, "
            f"Brier {_n(before['brier'])} -> {_n(after['brier'])} with temperature "
            f"{cal['temperature']:.2f} fitted on validation"
        )
    points = sections.get("operating_points")
    if points:
        lines.append(
            f"operating points, {points['positive_class']} vs rest (threshold from "
            f"validation -> test):"
        )
        for name, p in points["points"].items():
            if p is None:
                lines.append(f"  {name}: – (validation lacks one side)")
                continue
            rate, other = p["rate"], next(iter(p["target"]))
            val, test = p["validation"], p["test"]
            lines.append(
                f"  {operating_points.describe_point(p)}: val {_n(val[rate])} "
                f"-> test {_n(test[rate])} ({other} {_n(test[other])}, "
                f"threshold {_n(p['threshold'])})"
            )
    boot = sections.get("bootstrap")
    if boot:
        m = boot["metrics"]
        lines.append(
            f"bootstrap {round(100 * boot['confidence'])}% intervals "
            f"({boot['resamples']} stratified resamples of test): "
            f"acc {_ci(m['accuracy'])}, bal acc {_ci(m['balanced_accuracy'])}, "
            f"macro-F1 {_ci(m['macro_f1'])}, AUC {_ci(m['auc_macro'])}"
        )
    ground = sections.get("grounding")
    if ground:
        lines.append(
            f"grounding (Grad-CAM on a {'x'.join(map(str, ground['map_grid']))} grid vs "
            f"lesion masks; pointing tolerance {ground['tolerance_px']} px): "
            "mass inside / chance, pointing / chance"
        )
        for name, g in {**ground["per_class"], "all lesions": ground["all"]}.items():
            lines.append(
                f"  {name} (n={g['images']}): {_ci(g['mass_inside'], 'mean')} / "
                f"{_n(g['mass_chance']['mean'])}, {_ci(g['pointing'], 'mean')} / "
                f"{_n(g['pointing_chance']['mean'])}"
            )
    probes = sections.get("probes")
    if probes:
        lines.append(
            f"shortcut probes ({probes['lesion_images']} lesion images): "
            "accuracy, macro AUC, recall per class"
        )
        for version, v in probes["versions"].items():
            recall = ", ".join(f"{k} {_n(r)}" for k, r in v["recall"].items())
            lines.append(
                f"  {version}: acc {_n(v['accuracy'])}, AUC {_n(v['auc_macro'])}, {recall}"
            )
        lines.append(
            "  (the fills are out of distribution, and shadowing below a lesion survives "
            "its removal: see probes.limits)"
        )
    return "\n".join(lines)
