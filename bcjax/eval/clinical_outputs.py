"""The clinical sections of a run's report (issue 16), on its best checkpoint.

`clinical_sections`: the one call a run makes once its test part is predicted
(bcjax.clinical on probabilities, Grad-CAM maps and lesion masks); it writes the
figures and curves.json and returns the five sections results.json carries.
`format_sections`: their lines in the printed report. A cross-validation study
calls `aggregate_folds` (folds' results.json dicts, fold ensemble) and `format_folds`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from bcjax import clinical, files, report, stats
from bcjax.clinical import bootstrap
from bcjax.clinical import plots as clinical_plots
from bcjax.clinical.probes import shortcut_flags
from bcjax.data import pipeline
from bcjax.data.busi import Example
from bcjax.step import gradcam

SECTIONS = ("calibration", "operating_points", "bootstrap", "grounding", "probes")
CURVES_FILE = "curves.json"
# Below this many feature cells a side, a Grad-CAM map has too few cells to say
# where the evidence lies (ResNet at 64 px: 2x2; the pointing chance is ~1%).
MIN_GRID = 4
COARSE_NOTE = (
    "too coarse to judge: Grad-CAM on a {grid} grid can only peak in a few places, so "
    "these scores cannot say whether the model looks at the lesion (needs >= {least}x{least}; "
    "ResNet at 128 px gives 4x4, at 224 px 7x7)"
)


def load_masks(examples: Sequence[Example], image_size: int) -> np.ndarray:
    """bool [N, S, S]: each example's lesion masks squashed to S x S exactly as the
    pipeline squashes its image (pipeline.decode_resize), so mask and image pixels
    align; several masks are united after thresholding (at 127, as busi.read_mask).
    All False for an example without a mask (or BUSI's all-black normal ones). Decoded
    once per set of files (pipeline.decode_resize_all's shared cache)."""
    masks = np.zeros((len(examples), image_size, image_size), bool)
    owners = [i for i, example in enumerate(examples) for _ in example.mask_paths]
    if owners:
        paths = [path for example in examples for path in example.mask_paths]
        decoded = pipeline.decode_resize_all(paths, image_size).max(axis=-1) > 127
        np.logical_or.at(masks, np.asarray(owners), decoded)
    return masks


def gradcam_lowered(model, variables, test_images_shape, batch_size: int = 32):
    """The Grad-CAM program `clinical_sections` runs over test images of this shape, lowered
    from shapes alone (gradcam.lower_in_batches): a run compiles it while it trains, and the
    report then finds it compiled."""
    return gradcam.lower_in_batches(
        model, variables, test_images_shape, batch_size=batch_size, upsample=False
    )


def clinical_sections(
    *,
    model,
    variables,
    test_examples: Sequence[Example],
    test_images: np.ndarray,
    val_probs,
    val_labels,
    test_probs,
    test_labels,
    class_names: Sequence[str],
    positive_class: str | None,
    out_dir=None,
    seed: int = 0,
    eval_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 32,
    resamples: int = bootstrap.RESAMPLES,
) -> dict[str, Any]:
    """{"calibration", "operating_points", "bootstrap", "grounding", "probes"} of the
    best checkpoint on the test part; the figures and curves.json into `out_dir`.

    model, variables: the run's model in float32 (bf16 rounding shows in the maps)
      and its variables, for Grad-CAM; fetched to the host first, so replicated or
      sharded arrays both work and every process may call this.
    test_examples: the Examples of test_images, same order (a run's `RunData.test_examples`).
    test_images: uint8 [N, S, S, 3] as the pipeline decoded them.
    val_probs, val_labels, test_probs, test_labels: the eval step's raw predictions.
    out_dir: where the PNGs and curves.json go; None writes nothing (other processes).
    eval_fn(images_uint8 [N, S, S, 3]) -> probs [N, C]: the run's compiled eval step,
      for the probes' two altered copies; None uses the Grad-CAM function's
      probabilities instead (already compiled for this shape, so no compile either).

    grounding and probes are None when no test image has a lesion mask. The
    operating points' "curves" keep each class's AUC and average precision; their
    ROC and PR points are in curves.json.
    """
    names = list(class_names)
    test_images = np.asarray(test_images)
    if len(test_examples) != len(test_images):
        raise ValueError(f"{len(test_examples)} test examples for {len(test_images)} images")
    sections = clinical.clinical_report(
        val_probs,
        val_labels,
        test_probs,
        test_labels,
        names,
        positive_class=positive_class,
        seed=seed,
        resamples=resamples,
    )
    masks = load_masks(test_examples, test_images.shape[1])
    sections["grounding"] = sections["probes"] = None
    cams = None
    if masks.any():
        host_variables = jax.device_get(variables)

        def explain(images):
            return gradcam.explain_in_batches(
                model, host_variables, images, batch_size=batch_size, upsample=False
            )

        _, cams, explained = explain(test_images)
        grounding = clinical.grounding_report(
            cams, masks, test_labels, explained, names, seed=seed, resamples=resamples
        )
        if min(grounding["map_grid"]) < MIN_GRID:
            grid = "x".join(map(str, grounding["map_grid"]))
            grounding["note"] = COARSE_NOTE.format(grid=grid, least=MIN_GRID)
        sections["grounding"] = grounding
        forward = eval_fn or (lambda images: explain(images)[0])
        altered = clinical.probe_images(test_images, masks)
        sections["probes"] = clinical.probe_report(
            test_labels,
            altered["has_lesion"],
            {
                "original": test_probs,
                "lesion_removed": forward(altered["lesion_removed"]),
                "lesion_only": forward(altered["lesion_only"]),
            },
            names,
        )
        # Without a random-mark copy of the test images (a run has none), only the
        # lesion-removal criterion can flag a shortcut.
        sections["probes"]["shortcut"] = shortcut_flags(sections["probes"], positive_class)
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        clinical_plots.write_clinical_plots(
            sections, out_dir, images=test_images, masks=masks, cams=cams
        )
    points = sections["operating_points"]
    if points is not None:
        curves = points["curves"]
        if out_dir is not None:
            files.write_json(curves, out_dir / CURVES_FILE)
        points["curves"] = {
            name: {k: c[k] for k in ("auc", "average_precision", "positives")}
            for name, c in curves.items()
        }
        points["curves_file"] = CURVES_FILE
    return sections


def format_sections(sections: Mapping[str, Any]) -> str:
    """The printed report's lines for the clinical sections of `sections`."""
    ground = sections.get("grounding")
    lines = [clinical.format_clinical({k: v for k, v in sections.items() if k != "probes"})]
    if ground and ground.get("note"):
        lines.append(f"  grounding {ground['note']}")  # right under the grounding lines
    if "grounding" in sections and ground is None:
        lines.append("grounding, shortcut probes: no test image has a lesion mask")
    lines.append(clinical.format_clinical({"probes": sections.get("probes")}))
    shortcut = (sections.get("probes") or {}).get("shortcut")
    if shortcut:
        kept = shortcut["criteria"]["survives_lesion_removal"]
        verdict = "SUSPECTED" if shortcut["flagged"] else "not flagged"
        lines.append(
            f"  shortcut {verdict}: {shortcut['positive_class']} recall kept with the lesion "
            f"removed {report.number(kept.get('recall_kept'), 2)} "
            f"(flag at >= {kept['threshold']})"
        )
    return "\n".join(line for line in lines if line)


# ------------------------------------------------------------------ cross-validation


def fold_numbers(results: Mapping[str, Any], positive_class: str | None) -> dict[str, Any]:
    """The headline numbers of one run's clinical sections, flat: {name: value or None}."""
    out: dict[str, Any] = {}
    cal = results.get("calibration")
    if cal:
        before, after = cal["test"]["before"], cal["test"]["after"]
        out.update(
            temperature=cal["temperature"],
            ece=before["ece"],
            ece_scaled=after["ece"],
            brier=before["brier"],
            brier_scaled=after["brier"],
        )
    points = results.get("operating_points")
    if points:
        for name, p in points["points"].items():
            out[f"test_{name}"] = p["test"][p["rate"]] if p else None
    boot = results.get("bootstrap")
    if boot:
        for metric, entry in boot["metrics"].items():
            width = None if entry["low"] is None else entry["high"] - entry["low"]
            out[f"bootstrap_{metric}_width"] = width
    ground = results.get("grounding")
    if ground:
        for key in ("mass_inside", "mass_chance", "pointing", "pointing_chance"):
            out[f"grounding_{key}"] = ground["all"][key]["mean"]
    probes = results.get("probes")
    if probes:
        for version, v in probes["versions"].items():
            out[f"probe_{version}_accuracy"] = v["accuracy"]
            if positive_class is not None:
                out[f"probe_{version}_recall_{positive_class}"] = v["recall"].get(positive_class)
    return out


def aggregate_folds(
    fold_results: Sequence[Mapping[str, Any]],
    ensemble_probs,
    test_labels,
    class_names: Sequence[str],
    positive_class: str | None,
    seed: int = 0,
    *,
    folds: Sequence[int] | None = None,
    resamples: int = bootstrap.RESAMPLES,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The clinical numbers of a cross-validation study.

    {"folds": the fold ids of fold_results (`folds`, default 0, 1, ..),
     "per_fold": [fold_numbers of each results dict, in the order given],
     "stats": {name: stats.mean_ci over the folds (mean, sd, Student-t interval)},
     "ensemble": {"folds", "bootstrap": bootstrap section of the fold ensemble's
                  test probabilities (metrics only: the ensemble has no validation
                  part to choose operating thresholds on)}}
    """
    per_fold = [fold_numbers(r, positive_class) for r in fold_results]
    keys = list(dict.fromkeys(k for row in per_fold for k in row))
    ensemble_probs = np.asarray(ensemble_probs, np.float64)
    if ensemble_probs.shape[1] != len(class_names):
        raise ValueError(f"{len(class_names)} class names for probabilities {ensemble_probs.shape}")
    return {
        "folds": list(range(len(per_fold)) if folds is None else folds),
        "per_fold": per_fold,
        "stats": {k: stats.mean_ci([row.get(k) for row in per_fold], confidence) for k in keys},
        "ensemble": {
            "folds": len(fold_results),
            "bootstrap": bootstrap.bootstrap_section(
                ensemble_probs, test_labels, resamples=resamples, seed=seed
            ),
        },
    }


def format_folds(aggregated: Mapping[str, Any]) -> str:
    """Markdown: a table of the clinical numbers per fold with their mean, and the
    ensemble's bootstrap intervals."""
    rows, folds = aggregated["stats"], aggregated["folds"]
    lines = [
        "| clinical | " + " | ".join(f"fold {k}" for k in folds) + " | mean |",
        "|" + "---|" * (len(folds) + 2),
    ]
    for key, s in rows.items():
        values = [report.number(row.get(key), 3) for row in aggregated["per_fold"]]
        lines.append(f"| {key} | " + " | ".join(values) + f" | {report.number(s['mean'], 3)} |")
    boot = aggregated["ensemble"]["bootstrap"]
    intervals = "; ".join(
        f"{metric} {report.number(e['value'], 3)} [{report.number(e['low'], 3)}, "
        f"{report.number(e['high'], 3)}]"
        for metric, e in boot["metrics"].items()
    )
    lines += [
        "",
        f"- Fold ensemble on test, {round(100 * boot['confidence'])}% bootstrap intervals "
        f"({boot['resamples']} stratified resamples): {intervals}",
    ]
    return "\n".join(lines)
