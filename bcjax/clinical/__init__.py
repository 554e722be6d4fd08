"""What a clinical reader asks of a classifier, from its predictions and heat maps.

Bottom layer: numpy and scipy only (matplotlib in `plots`), no JAX, so any
layer can use it. One job per module:

  calibration        top-label ECE, Brier score, temperature scaling
  operating_points   sensitivity/specificity targets, thresholds from validation; ROC, PR
  bootstrap          stratified, seeded percentile intervals of test metrics
  grounding          heat-map mass inside lesion masks, pointing game, chance levels
  probes             lesion-removed and lesion-only copies of images, and their scores
  summary            clinical_report (the three prediction sections) and console lines
  plots              reliability, ROC, PR and least-grounded figures (imported on use)

A run calls, on its best checkpoint (probabilities from its eval step; maps
from bcjax.step.gradcam on a float32 copy of the model):

  names = data.class_names
  sections = clinical_report(val_probs, val_labels, test_probs, test_labels, names,
                             positive_class=data.positive_class, seed=config.seed)
  probs, cams, predicted = gradcam.explain_in_batches(model, variables, test_images,
                                                      upsample=False)
  sections["grounding"] = grounding_report(cams, test_masks, test_labels, predicted, names)
  altered = probe_images(test_images, test_masks)
  sections["probes"] = probe_report(test_labels, altered["has_lesion"],
                                    {"original": test_probs,
                                     "lesion_removed": predict(altered["lesion_removed"]),
                                     "lesion_only": predict(altered["lesion_only"])}, names)
  plots.write_clinical_plots(sections, workdir, images=test_images, masks=test_masks,
                             cams=cams)
  print(format_clinical(sections))
"""

from bcjax.clinical.grounding import grounding_report
from bcjax.clinical.probes import probe_images, probe_report, shortcut_flags
from bcjax.clinical.summary import clinical_report, format_clinical

__all__ = [
    "clinical_report",
    "format_clinical",
    "grounding_report",
    "probe_images",
    "probe_report",
    "shortcut_flags",
]
