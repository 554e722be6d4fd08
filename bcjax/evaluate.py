"""A finished run scored on an external labelled set: another hospital's images, another public set.

    python -m bcjax.evaluate --workdir runs/r18 --data /data/other_set
    python -m bcjax.evaluate --workdir runs/r18 --data labels.csv --class-map cancer=malignant \\
        --drop-class unsure --out runs/r18/external/other

The data may be anything the readers accept (``bcjax.data.readers.detect``): BUSI's folder
or zip, class folders, or a CSV, of PNG, JPEG or DICOM images (``bcjax.data.dicom``). Its
images are decoded and resized by the function a run uses (``bcjax.data.pipeline``) and
scored by the run's best checkpoint (``--step N``: another) through
``bcjax.predict.Predictor``, in float32.

Classes are matched by name, never guessed (not even by letter case; within the external
set, labels that differ only in case or spaces are one class, ``bcjax.data.readers``):

1. The model's classes, in order, are the run's (its manifest's ``class_names``; BUSI's
   three for runs older than that). The external set's come from its reader.
2. ``--drop-class NAME`` leaves out the external images of class NAME.
3. ``--class-map EXT=MODEL,...`` scores the images of external class EXT as model class
   MODEL. Several external classes may map to one model class (cyst=benign,fibroadenoma=benign).
   A class neither mapped nor dropped keeps its name.
4. Every remaining external class must then be a model class. Otherwise nothing is scored:
   the error lists both class lists and the differences.
5. The external set may lack some of the model's classes (a benign/malignant set against a
   normal/benign/malignant model). The prediction is still the argmax over all the model's
   classes, so a benign image called "normal" is an error. The confusion matrix keeps every
   model class (absent ones have empty rows). An absent class has support 0, AUC None and
   precision/recall/F1 0. Balanced accuracy, macro precision/recall/F1 and macro AUC average
   over the classes present only. metrics.json lists the absent ones as "classes_absent".
6. One class is enough (50 biopsy-proven cancers from another hospital): metrics.json then
   has a "class_subset" section (``bcjax.eval.class_subset``) with each present class's
   recall and its bootstrap interval, its confusion row, the calibration, and the metrics
   that are undefined on such a set and why (an AUC needs images of two classes).

Written into ``--out`` (default ``RUN/external/<name>``, where ``<name>`` is the data's folder or
CSV name), the files a run writes for its test part:

    metrics.json                   results.json's "test" report (metrics.classification_report;
                                   loss: mean cross-entropy), plus "classes_absent" and an
                                   "evaluation" block (checkpoint, data, class mapping)
    confusion_matrix.png
    <name>_predictions.npz         names, labels, probs: the keys of a run's test_predictions.npz
    <name>_predictions.csv         name, file, external_label, label, p_<class>..., predicted
    duplicates_with_training.json  scored images that duplicate one of the run's training images

A duplicate is found by the rule splits uses to group near duplicates. Their 64-bit
perceptual hashes are at most the manifest's ``hash_threshold`` bits apart. It is "exact"
when the two files are byte for byte the same, "near" otherwise. Metrics include
duplicates: the report says how many there are.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np

from bcjax import files, predict, report, specs
from bcjax.data import manifest as manifest_lib
from bcjax.data import overlap, pipeline, readers, splits
from bcjax.data.busi import BusiError, Example
from bcjax.data.class_map import ClassMapError, map_classes, parse_class_map

CHUNK = 256  # images decoded and scored at a time: bounded memory, and a progress line each


# An external set or class mapping that cannot be used; the message says why.
EvaluateError = ClassMapError


# ----------------------------------------------------------------------------- classes


def run_classes(workdir: pathlib.Path) -> tuple[tuple[str, ...], dict | None]:
    """(the model's class names, the run's split manifest or None for a run without one)."""
    path = workdir / "manifest.json"
    if not path.is_file():
        return manifest_lib.BUSI_CLASSES, None
    manifest = manifest_lib.load_manifest(path)
    return manifest_lib.manifest_class_names(manifest), manifest


# ----------------------------------------------------------------------------- the report


def external_report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """``metrics.classification_report`` with macro averages over the classes present (rule 5)."""
    from bcjax.eval import metrics  # the training stack, only when scoring

    probs64 = np.asarray(probs, np.float64)
    picked = probs64[np.arange(len(labels)), labels]
    loss = float(np.mean(-np.log(np.clip(picked, 1e-300, None))))  # as the eval step's loss
    out = metrics.classification_report(probs, labels, class_names, loss=loss)
    per_class = out["per_class"]
    present = [c for c in class_names if per_class[c]["support"] > 0]
    absent = [c for c in class_names if per_class[c]["support"] == 0]
    if absent:
        # classification_report averages over classes present *or predicted*: a predicted
        # absent class would enter with F1 0, though its errors already lower the recall of
        # the true classes. Averaging over the present ones is comparable to a model of
        # those classes alone.
        for key in ("precision", "recall", "f1"):
            out[f"macro_{key}"] = float(np.mean([per_class[c][key] for c in present]))
    out["classes_absent"] = absent
    if absent:  # what a set with some of the classes defines, and what it does not
        from bcjax.eval import class_subset

        out["class_subset"] = class_subset.subset_report(probs, labels, class_names)
    return out


# ----------------------------------------------------------------------------- duplicates


def training_examples(
    workdir: pathlib.Path, manifest: dict, class_names: Sequence[str]
) -> list[Example]:
    """The run's training images, found again where the run read them; BusiError if gone."""
    source = manifest.get("meta", {}).get("source")
    if not source:  # manifests older than the source record: results.json says where
        results = json.loads((workdir / "results.json").read_text())
        source = {"dataset": results.get("dataset"), "path": results.get("data_path")}
    if not source.get("path"):
        raise BusiError("the run records no data path")
    kind = "busi" if source["dataset"] in ("busi", "synthetic") else source["dataset"]
    labelled = readers.read(kind, source["path"], class_names=class_names, verify=False)
    return manifest_lib.select(labelled.examples, manifest["train"])


def duplicates_with_training(workdir, manifest, class_names, examples, hashes, echo) -> dict:
    """duplicates_with_training.json's dict; "checked": False when the training images are gone."""
    threshold = int(
        (manifest or {}).get("meta", {}).get("hash_threshold", splits.DEFAULT_HASH_THRESHOLD)
    )
    out = {
        "hash": "dct-phash-64",
        "hash_threshold": threshold,
        "rule": f"perceptual hashes at most {threshold} of 64 bits apart (as splits groups "
        "near duplicates); exact: the files are byte for byte the same",
        "external_images": len(examples),
    }
    try:
        if manifest is None:
            raise BusiError("the run has no manifest.json listing its training images")
        train = training_examples(workdir, manifest, class_names)
        # The run's own hash cache: it holds every training image the run split.
        train_hashes = splits.phashes(train, cache_dir=workdir / "cache")
    except BusiError as e:
        echo(f"WARNING: not checked for duplicates of the training images: {e}")
        return {**out, "checked": False, "reason": str(e)}
    found = overlap.find_duplicates(examples, hashes, train, train_hashes, class_names, threshold)
    exact = sum(d["kind"] == "exact" for d in found)
    echo(
        f"Duplicates of the run's {report.count(len(train), 'training image')}: {len(found)} of "
        f"the scored images ({exact} exact, {len(found) - exact} near); the metrics include them."
    )
    return {
        **out,
        "checked": True,
        "training_images": len(train),
        "num_duplicates": len(found),
        "num_exact": exact,
        "num_near": len(found) - exact,
        "duplicates": found,
    }


# ----------------------------------------------------------------------------- evaluation


def reader_kind(path) -> str:
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise EvaluateError(f"no such folder, zip or CSV: {path}")
    return readers.detect(path)


def data_name(path) -> str:
    """A file-name-safe name of the data: its folder's name, or its file's stem."""
    path = pathlib.Path(path).expanduser().resolve()
    name = path.stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "external"


def load_predictor(workdir: pathlib.Path, step: int | None, class_names: tuple[str, ...]):
    """The run's Predictor; its head has the run's classes."""
    predictor = predict.Predictor.from_workdir(workdir, step=step)
    if predictor.class_names != tuple(class_names):  # the manifest and results disagree
        raise EvaluateError(
            f"{workdir}: the checkpoint's classes {predictor.class_names} are not the "
            f"manifest's {tuple(class_names)}"
        )
    return predictor


def read_external(data, class_names, class_map, drop, echo) -> tuple[readers.LabelledSet, dict]:
    """(the external set as its reader found it, external class -> model class for the kept)."""
    kind = reader_kind(data)
    labelled = readers.read(kind, data, min_classes=1)  # one class is a question too
    mapping = map_classes(class_names, labelled.class_names, class_map, drop)
    counts = labelled.class_counts()
    listed = ", ".join(f"{c} {n}" for c, n in counts.items())
    echo(f"External set {labelled.path} ({kind}): {len(labelled.examples)} images, {listed}")
    for c in labelled.class_names:
        if c not in mapping:
            echo(f"  {c}: dropped ({report.count(counts[c], 'image')})")
        elif mapping[c] != c:
            echo(f"  {c}: scored as {mapping[c]}")
    if labelled.dicom_files:
        from bcjax.data import dicom

        echo(f"DICOM: {report.count(len(labelled.dicom_files), 'file')}")
        for line in dicom.notices(labelled.dicom_files):
            echo(f"  {line}")
    return labelled, mapping


def score(predictor, examples: Sequence[Example], echo) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], perceptual hashes [N]); each image decoded once, as a run does."""
    probs, hashes = [], []
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        arrays, chunk_hashes = pipeline.load_arrays_and_phashes(chunk, predictor.image_size)
        probs.append(predictor.predict(arrays.images))
        hashes.append(chunk_hashes)
        if len(examples) > CHUNK:
            echo(f"  scored {start + len(chunk)}/{len(examples)}")
    return np.concatenate(probs), np.concatenate(hashes)


def evaluate_external(
    workdir,
    data,
    out=None,
    *,
    step: int | None = None,
    class_map: dict[str, str] | None = None,
    drop: Sequence[str] = (),
    echo: Callable[[str], None] = lambda line: None,
) -> dict:
    """Scores the run in ``workdir`` on the labelled set at ``data``; writes the report files
    into ``out`` (see the module doc) and returns metrics.json's dict. ``echo`` gets progress
    lines. Errors for bad input: EvaluateError, predict.PredictError, busi.BusiError."""
    workdir = pathlib.Path(workdir).expanduser()
    config, best = predict.read_run(workdir)  # PredictError unless a finished run
    model_name = specs.from_config(config).model.name
    results = json.loads((workdir / "results.json").read_text())
    class_names, manifest = run_classes(workdir)
    name = data_name(data)
    out = pathlib.Path(out).expanduser() if out is not None else workdir / "external" / name
    labelled, mapping = read_external(data, class_names, class_map or {}, drop, echo)
    examples = [ex for ex in labelled.examples if labelled.class_names[ex.label] in mapping]
    external_labels = [labelled.class_names[ex.label] for ex in examples]
    labels = np.array([class_names.index(mapping[c]) for c in external_labels], np.int64)
    absent = [c for c in class_names if c not in mapping.values()]
    note = None
    if absent:
        present = ", ".join(c for c in class_names if c not in absent)
        note = (
            f"The external set has no images of {', '.join(absent)}: metrics average over "
            f"{present}; predictions are still the argmax over all {len(class_names)} classes."
        )
        echo(f"Note: {note}")

    predictor = load_predictor(workdir, step, class_names)
    spe = results.get("steps_per_epoch")
    epoch = predictor.step // spe if predictor.step is not None and spe else None
    if step is not None:
        which = "as asked"
    elif best is not None:
        which = f"the best by validation {results.get('best_metric')}"
    else:
        which = "the latest"  # results.json does not say which was best
    echo(
        f"Run {workdir}: {model_name}, checkpoint step {predictor.step} (epoch {epoch}, "
        f"{which}); scoring {report.count(len(examples), 'image')} at {predictor.image_size} px."
    )
    probs, hashes = score(predictor, examples, echo)
    metrics = external_report(probs, labels, class_names)
    duplicates = duplicates_with_training(workdir, manifest, class_names, examples, hashes, echo)
    counts = labelled.class_counts()
    metrics["evaluation"] = {
        "workdir": str(workdir),
        "out": str(out),
        "model": model_name,
        "checkpoint_step": predictor.step,
        "checkpoint_epoch": epoch,
        "data": labelled.path,
        "reader": labelled.kind,
        "name": name,
        "model_classes": list(class_names),
        "external_class_counts": counts,
        "class_map": {c: m for c, m in mapping.items() if c != m},
        "dropped": {c: counts[c] for c in labelled.class_names if c not in mapping},
        "note": note,
        "duplicates_with_training": duplicates.get("num_duplicates"),
    }
    write_outputs(out, name, metrics, duplicates, examples, external_labels, labels, probs)
    return metrics


def write_outputs(
    out: pathlib.Path,
    name: str,
    metrics: dict,
    duplicates: dict,
    examples: Sequence[Example],
    external_labels: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
) -> None:
    """The report files of the module doc, each written atomically."""
    from bcjax.eval import plots

    class_names = metrics["class_names"]
    files.write_json(metrics, out / "metrics.json")
    files.save_npz(
        out / f"{name}_predictions.npz",
        names=np.asarray([e.name for e in examples]),
        labels=labels,
        probs=probs,
    )
    rows = [
        {
            "name": ex.name,
            "file": ex.image_path,
            "external_label": ext,
            "label": class_names[label],
            **{f"p_{c}": float(v) for c, v in zip(class_names, p)},
            "predicted": class_names[int(np.argmax(p))],
        }
        for ex, ext, label, p in zip(examples, external_labels, labels, probs)
    ]
    columns = ["name", "file", "external_label", "label", *(f"p_{c}" for c in class_names)]
    columns.append("predicted")
    report.write_csv(rows, out / f"{name}_predictions.csv", columns)
    files.write_json(duplicates, out / "duplicates_with_training.json")
    plots.plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]),
        class_names,
        out / "confusion_matrix.png",
        title=f"{name} (n={metrics['num_examples']})",
    )


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bcjax.evaluate",
        description="Scores a finished run's best checkpoint on an external labelled set.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument(
        "--data", required=True, help="BUSI folder or zip, a folder of class folders, or a CSV"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: WORKDIR/external/NAME)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the best)"
    )
    parser.add_argument(
        "--class-map",
        action="append",
        default=[],
        metavar="EXT=MODEL[,...]",
        help="score external class EXT as the model's class MODEL",
    )
    parser.add_argument(
        "--drop-class",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="leave out the external images of class NAME",
    )
    args = parser.parse_args(argv)
    # Orbax warns through absl that a read-only checkpoint directory is read-only.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        metrics = evaluate_external(
            args.workdir,
            args.data,
            args.out,
            step=args.step,
            class_map=parse_class_map(args.class_map),
            drop=args.drop_class,
            echo=lambda line: print(line, flush=True),
        )
    except (EvaluateError, predict.PredictError, BusiError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        absl_logger.setLevel(level)
    from bcjax.eval import metrics as metrics_lib

    evaluation = metrics["evaluation"]
    print(metrics_lib.format_report(metrics))
    if "class_subset" in metrics:
        from bcjax.eval import class_subset

        print("\n" + class_subset.format_subset(metrics["class_subset"]))
    print(
        f"\nWrote metrics.json, confusion_matrix.png, {evaluation['name']}_predictions.npz/.csv "
        f"and duplicates_with_training.json into {evaluation['out']}"
    )
    if evaluation["duplicates_with_training"]:  # the last line read: the metrics include them
        print(
            f"{evaluation['duplicates_with_training']} scored image(s) duplicate the run's "
            "training images: see duplicates_with_training.json."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
