"""Class probabilities and Grad-CAM heat maps from a finished run's best checkpoint.

    python -m bcjax.predict --workdir runs/r18 --images a.png b.png
    python -m bcjax.predict --workdir runs/r18 --images some_folder/ --out preds

prints a table of probabilities and writes ``predictions.csv`` and one
``<image>_gradcam.png`` per image (image left, heat map overlaid right) into
``--out`` (default ``<workdir>/predictions``). The classes are the run's own
(results.json's ``class_names``, else its manifest's): the CSV has one column
``p_<class>`` per class, and ``--class`` takes one of them. From Python:

    predictor = Predictor.from_workdir("runs/r18")
    probs = predictor.predict(["a.png", "b.png"])   # [N, C]: predictor.class_names' order
    cams = predictor.grad_cam(["a.png", "b.png"])   # [N, S, S] in [0, 1]
    rows = predict_files("runs/r18", ["a.png"], "preds")

Images are decoded and resized exactly as for training
(``bcjax.data.pipeline.decode_resize``, ``bcjax.data.augment.normalize``).
The model runs in float32 whatever dtype it was trained in: inference on a
few images is cheap, and float32 keeps the heat maps free of bf16 rounding.

Grad-CAM (Selvaraju et al. 2017) is computed by ``bcjax.step.gradcam``, the
same compiled function the training loop uses for its grounding report. The
overlay PNGs and the printed table are drawn by ``bcjax.predict.overlays``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bcjax.data import augment, busi, dicom, pipeline
from bcjax.data import manifest as manifest_lib
from bcjax.predict.overlays import display_image, format_table, save_overlay, title, unique_names
from bcjax.step import gradcam
from bcjax.step.gradcam import normalise_maps  # noqa: F401  (part of this module's API)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

ImagesLike = np.ndarray | Sequence[str | pathlib.Path] | str | pathlib.Path


class PredictError(ValueError):
    """A workdir or an image that cannot be used; the message names it."""


# ----------------------------------------------------------------------------- model functions


def _probabilities(model, variables, images_uint8):
    logits = model.apply(variables, augment.normalize(images_uint8), train=False)
    return jax.nn.softmax(logits)


# Module-level jit with the model as a static argument: Predictors of equal
# models (the CLI and the API on one run) share one compile; so does Grad-CAM
# (gradcam.explain_jit) with the training loop's.
_probabilities_jit = jax.jit(_probabilities, static_argnums=0)


# ----------------------------------------------------------------------------- images


def find_images(path, exclude: pathlib.Path | None = None) -> list[pathlib.Path]:
    """A file as itself; a folder as every png/jpg/DICOM below it, sorted, without BUSI's
    ``*_mask*`` files (segmentations, not images) and without anything under ``exclude``."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise PredictError(f"No such image or folder: {path}")
    if not path.is_dir():
        return [path]
    exclude = exclude.resolve() if exclude is not None else None
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and (p.suffix.lower() in IMAGE_SUFFIXES or dicom.is_dicom(p))
        and "_mask" not in p.stem
        and not (exclude is not None and p.resolve().is_relative_to(exclude))
    )
    if not found:
        raise PredictError(f"No png/jpg/DICOM images in the folder {path}.")
    return found


def load_images(paths: Sequence, image_size: int) -> np.ndarray:
    """uint8 [N, S, S, 3], decoded and resized as training does; PredictError naming a bad file."""
    images = []
    for path in paths:
        if not pathlib.Path(path).is_file():
            raise PredictError(f"No such image file: {path}")
        try:
            images.append(pipeline.decode_resize(path, image_size))
        except busi.BusiError as e:
            raise PredictError(f"Cannot read the image {path}: {e}") from e
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)


# ----------------------------------------------------------------------------- the predictor


class Predictor:
    """A model and its variables, ready to classify and explain images.

    ``images`` arguments take a uint8 array [N, S, S, 3] (or one [S, S, 3]
    image) already at the model's size, or image paths (a str or Path, or a
    list of them; a folder means the images in it).
    """

    def __init__(
        self,
        model,
        variables: dict,
        image_size: int,
        *,
        class_names: Sequence[str],
        batch_size: int = 16,
        step: int | None = None,
    ):
        """class_names: what the model's outputs are, in order (the run's classes)."""
        self.model = model
        self.variables = {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
        }
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.class_names = tuple(class_names)
        self.step = step

    @classmethod
    def from_workdir(cls, workdir, *, step: int | None = None, batch_size: int = 16) -> Predictor:
        """The run's model (from results.json's config) with its best checkpoint (or ``step``)."""
        from bcjax import specs
        from bcjax.models import family
        from bcjax.train import checkpoint  # the training stack, only when loading a run

        workdir = pathlib.Path(workdir).expanduser()
        config, best = read_run(workdir)
        class_names = run_class_names(workdir)
        step = best if step is None else int(step)  # None: the latest
        try:
            variables = checkpoint.read_variables(workdir / "checkpoints", step)
        except FileNotFoundError as e:
            raise PredictError(f"The run {workdir} has no usable checkpoint: {e}") from e
        run_specs = specs.from_config(config)  # an older run's config completed by the defaults
        model = family.create_model(
            run_specs.model, num_classes=len(class_names), dtype=jnp.float32
        )
        return cls(
            model,
            jax.tree.map(jnp.asarray, variables),
            run_specs.data.image_size,
            batch_size=batch_size,
            class_names=class_names,
            step=step,
        )

    # -- inputs -------------------------------------------------------------------
    def as_images(self, images: ImagesLike) -> np.ndarray:
        """uint8 [N, S, S, 3] from any accepted ``images`` argument."""
        if isinstance(images, (str, pathlib.Path)):
            images = find_images(images)
        if isinstance(images, np.ndarray) or hasattr(images, "shape"):
            array = np.asarray(images)
            if array.ndim == 3:
                array = array[None]
            want = (self.image_size, self.image_size, 3)
            if array.ndim != 4 or array.shape[1:] != want or array.dtype != np.uint8:
                raise PredictError(
                    f"Image arrays must be uint8 [N, {want[0]}, {want[1]}, 3] "
                    f"(the run's image_size); got {array.dtype} {array.shape}. "
                    "Pass file paths to have them resized as in training."
                )
            return array
        paths = [p for item in images for p in find_images(item)]
        return load_images(paths, self.image_size)

    def _targets(self, class_index, n: int) -> np.ndarray:
        if class_index is None:
            return np.full((n,), -1, np.int32)
        items = (
            [class_index] * n
            if isinstance(class_index, (int, str, np.integer))
            else list(class_index)
        )
        if len(items) != n:
            raise PredictError(f"class_index has {len(items)} entries for {n} images.")
        out = []
        for c in items:
            if isinstance(c, str):
                if c not in self.class_names:
                    raise PredictError(
                        f"Unknown class {c!r}; classes: {', '.join(self.class_names)}."
                    )
                c = self.class_names.index(c)
            if not 0 <= int(c) < len(self.class_names):
                raise PredictError(f"class index {c} out of range 0..{len(self.class_names) - 1}.")
            out.append(int(c))
        return np.asarray(out, np.int32)

    def _batched(self, fn, images: np.ndarray, *per_example: np.ndarray):
        """fn over fixed-size chunks (the last one padded), so a call compiles once."""
        if len(images) == 0:
            raise PredictError("No images to predict.")
        return gradcam.in_batches(
            fn, self.model, self.variables, self.batch_size, images, *per_example
        )

    # -- outputs ------------------------------------------------------------------
    def predict(self, images: ImagesLike) -> np.ndarray:
        """Class probabilities, float32 [N, C] in ``class_names``' order; rows sum to 1."""
        return self._batched(_probabilities_jit, self.as_images(images))

    def explain(self, images: ImagesLike, class_index=None):
        """``(probs [N, C], cams [N, S, S] in [0, 1], explained class [N])`` in one pass.

        ``class_index``: None (each image's predicted class), a class index or
        name for all images, or one per image.
        """
        array = self.as_images(images)
        return self._batched(gradcam.explain_jit, array, self._targets(class_index, len(array)))

    def grad_cam(self, images: ImagesLike, class_index=None) -> np.ndarray:
        """Grad-CAM heat maps, float32 [N, S, S] in [0, 1]; see ``explain``."""
        return self.explain(images, class_index)[1]


def read_run(workdir) -> tuple[ml_collections.ConfigDict, int | None]:
    """(the run's config, the step of its best checkpoint) from results.json;
    the step is None when results.json does not say (then the latest is used)."""
    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.is_dir():
        raise PredictError(f"No run workdir at {workdir}.")
    results_path = workdir / "results.json"
    if not results_path.is_file():
        raise PredictError(
            f"{results_path} is missing: {workdir} holds no finished bcjax run "
            "(results.json is written when training ends; rerun the training "
            "command to finish it)."
        )
    results = json.loads(results_path.read_text())
    if "config" not in results:
        raise PredictError(f"{results_path} has no 'config': not written by bcjax.train.loop.")
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise PredictError(f"No checkpoint in {ckpt_dir}: the run's checkpoints are missing.")
    # Checkpoints are saved at epoch ends, so the loop's best_epoch gives the step exactly.
    best = None
    if results.get("best_epoch") is not None and results.get("steps_per_epoch"):
        best = results["best_epoch"] * results["steps_per_epoch"]
    return ml_collections.ConfigDict(results["config"]), None if best is None else int(best)


def run_class_names(workdir) -> tuple[str, ...]:
    """The classes a finished run was trained on, in label order: results.json's
    ``class_names``; for runs from before that field, the manifest's (BUSI's three
    for manifests older still)."""
    workdir = pathlib.Path(workdir).expanduser()
    results = json.loads((workdir / "results.json").read_text())
    if results.get("class_names"):
        return tuple(results["class_names"])
    manifest = workdir / "manifest.json"
    if manifest.is_file():
        return manifest_lib.manifest_class_names(json.loads(manifest.read_text()))
    return tuple(results["test"]["class_names"])


# ----------------------------------------------------------------------------- files out


def predict_files(
    workdir,
    paths: Sequence,
    out_dir=None,
    *,
    class_index=None,
    predictor: Predictor | None = None,
    overlays: bool = True,
) -> list[dict]:
    """Predicts ``paths`` (files or folders) with the run in ``workdir``; writes
    ``predictions.csv`` and, with ``overlays``, one Grad-CAM PNG per image into
    ``out_dir`` (default ``<workdir>/predictions``). Returns the CSV rows as dicts."""
    workdir = pathlib.Path(workdir).expanduser()
    out_dir = pathlib.Path(out_dir).expanduser() if out_dir is not None else workdir / "predictions"
    predictor = predictor or Predictor.from_workdir(workdir)
    files = [p for item in paths for p in find_images(item, exclude=out_dir)]
    images = load_images(files, predictor.image_size)
    probs, cams, targets = predictor.explain(images, class_index)

    out_dir.mkdir(parents=True, exist_ok=True)
    names = predictor.class_names
    rows = []
    for f, p in zip(files, probs):
        rows.append(
            {
                "file": str(f),
                **{f"p_{c}": float(v) for c, v in zip(names, p)},
                "predicted": names[int(np.argmax(p))],
            }
        )
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", *(f"p_{c}" for c in names), "predicted"])
        writer.writeheader()
        writer.writerows(rows)
    if overlays:
        for i, name in enumerate(unique_names(files)):
            save_overlay(
                out_dir / name,
                display_image(files[i], images[i]),
                cams[i],
                title=title(files[i], probs[i], int(targets[i]), names),
            )
    return rows


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bcjax.predict",
        description="Class probabilities and Grad-CAM heat maps from a run's best checkpoint.",
    )
    parser.add_argument(
        "--workdir", required=True, help="the run's workdir (results.json, checkpoints/)"
    )
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="image files and/or folders (png/jpg; *_mask* files skipped)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/predictions)")
    parser.add_argument(
        "--class",
        dest="class_name",
        default=None,
        metavar="CLASS",
        help="one of the run's classes: the class whose Grad-CAM to draw "
        "(default: each image's predicted class)",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the best)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--no-overlays", action="store_true", help="write predictions.csv only")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "predictions"
    # Orbax warns through absl that a read-only checkpoint directory is read-only.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        predictor = Predictor.from_workdir(args.workdir, step=args.step, batch_size=args.batch_size)
        if args.class_name is not None and args.class_name not in predictor.class_names:
            parser.error(
                f"argument --class: invalid choice: {args.class_name!r} (the run's "
                f"classes: {', '.join(predictor.class_names)})"
            )
        rows = predict_files(
            args.workdir,
            args.images,
            out,
            class_index=args.class_name,
            predictor=predictor,
            overlays=not args.no_overlays,
        )
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        absl_logger.setLevel(level)
    print(format_table(rows))
    print(
        f"\nWrote {out / 'predictions.csv'}"
        + ("" if args.no_overlays else " and Grad-CAM overlays")
        + f" ({len(rows)} image{'' if len(rows) == 1 else 's'})."
    )
    return 0
