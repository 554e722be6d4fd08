"""Evaluation: what a trained model's outputs say, shared by training, ``evaluate`` and ``cv``.

metrics          classification metrics from a confusion matrix and scores (as scikit-learn)
accumulators     device outputs gathered batch by batch into a metrics report
clinical_outputs the clinical sections of a run and of a cross-validation study
plots            training curves and confusion matrices as PNG
"""
