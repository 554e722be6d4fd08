"""Evaluators: what a run measures of a train state, each a small object with one
method, ``run(state) -> dict`` (in the manner of big_vision's evaluators).

    Validation     the validation part's report (the loop runs it every eval_every_epochs)
    Test           the test and validation parts scored, with their predictions
    ClinicalReport calibration, operating points, bootstrap, grounding, probes
    Breakdown      the train step's compute vs collective time (bcjax.timing)

They are built with what they need and share a `Scorer`, the compiled eval
step over a part. The clinical report and the breakdown import their heavy
machinery (bcjax.clinical, plots, Grad-CAM, bcjax.timing.breakdown) when run,
so training loads none of it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from bcjax.data import pipeline
from bcjax.eval import accumulators

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    name: str

    def run(self, state) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Scorer:
    """The eval step over every example of a part exactly once (padding masked out).

    steps: bcjax.parallel.strategies.Steps (its eval_step and shard_batch).
    global_batch_size: the eval step's global batch (bcjax.train.loop.eval_batch_size).
    class_names: what the labels index; positive_class: the one a 2-class report
    calls positive (None: the last). eval_step: steps.eval_step compiled ahead
    (the loop compiles it in its compile phase); None: steps.eval_step, compiled
    on its first batch.
    """

    steps: Any
    global_batch_size: int
    class_names: tuple[str, ...]
    positive_class: str | None = None
    eval_step: Callable | None = None

    def __call__(self, state, data: pipeline.ArraySet, *, with_arrays: bool = False):
        """A report dict; with_arrays: also {"names", "labels", "probs"} in data's order."""
        accumulator = accumulators.EvalAccumulator(
            len(self.class_names), list(self.class_names), positive_class=self.positive_class
        )
        eval_step = self.eval_step or self.steps.eval_step
        # One batch ahead: the next batch is on its way to the devices before this one's
        # outputs are read (a read waits for its batch), so the devices never wait for the
        # host's batching and accumulating. The accumulation order is the batches' order.
        ahead = None
        for batch in pipeline.eval_batches(
            data, self.global_batch_size, jax.process_index(), jax.process_count()
        ):
            out = eval_step(state, self.steps.shard_batch(batch))
            if ahead is not None:
                accumulator.update(ahead["logits"], ahead["label"], ahead["valid"], ahead["loss"])
            ahead = out
        if ahead is not None:
            accumulator.update(ahead["logits"], ahead["label"], ahead["valid"], ahead["loss"])
        if not with_arrays:
            return accumulator.compute()
        arrays = accumulator.arrays()
        return accumulator.compute(), {
            "names": np.asarray(data.names),
            "labels": np.asarray(arrays["labels"]),
            "probs": np.asarray(arrays["probs"]),
        }


@dataclasses.dataclass(frozen=True)
class Validation:
    """The validation part's report: loss, accuracy, macro-F1, ... (bcjax.eval.metrics)."""

    score: Scorer
    data: pipeline.ArraySet
    name: str = "val"

    def run(self, state) -> dict:
        return self.score(state, self.data)


@dataclasses.dataclass(frozen=True)
class Test:
    """{"test": report, "predictions": {"test", "val"}}: the held-out part scored, and both
    parts' predictions (names, labels, probs) for the files and the clinical report."""

    score: Scorer
    test: pipeline.ArraySet
    val: pipeline.ArraySet
    name: str = "test"

    def run(self, state) -> dict:
        report, test_predictions = self.score(state, self.test, with_arrays=True)
        _, val_predictions = self.score(state, self.val, with_arrays=True)
        return {"test": report, "predictions": {"test": test_predictions, "val": val_predictions}}


@dataclasses.dataclass(frozen=True)
class ClinicalReport:
    """Calibration, operating points, bootstrap, grounding and probes of the test part
    (bcjax.eval.clinical_outputs): the sections results.json carries, and their PNGs.

    model: a float32 model of the run's network; predictions: Test's; test_examples:
    the test part's Examples (mask paths) in the order of `test`, as the run read its
    data (bcjax.data.datasets.RunData), so the report reads no source again; out_dir: where
    the PNGs go (None on every process but the main one). Every process runs it: the
    probes go through the (collective) eval step.
    """

    score: Scorer
    model: Any
    test: pipeline.ArraySet
    test_examples: Sequence[Any]
    predictions: dict
    out_dir: Any
    seed: int
    batch_size: int
    name: str = "clinical"

    def run(self, state) -> dict:
        from bcjax.eval import clinical_outputs

        def probs_of(images):  # the probes' altered test images through the eval step
            altered = pipeline.ArraySet(images, self.test.labels, self.test.names)
            return self.score(state, altered, with_arrays=True)[1]["probs"]

        val, test = self.predictions["val"], self.predictions["test"]
        sections = clinical_outputs.clinical_sections(
            model=self.model,
            variables=state.variables,
            test_examples=self.test_examples,
            test_images=self.test.images,
            val_probs=val["probs"],
            val_labels=val["labels"],
            test_probs=test["probs"],
            test_labels=test["labels"],
            class_names=self.score.class_names,
            positive_class=self.score.positive_class,
            out_dir=self.out_dir,
            seed=self.seed,
            eval_fn=probs_of,
            batch_size=self.batch_size,
        )
        log.info(
            "Clinical (best checkpoint, test part):\n%s",
            clinical_outputs.format_sections(sections),
        )
        return sections


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """The train step's compute vs collective time, from the executable, compile and step
    times the loop already has (bcjax.timing.breakdown.from_run).

    executable: the compiled train step; host_batch: the batch it was compiled for;
    train_images: the training images when the batch carries indices only (images
    kept on the devices); chrono: the run's clock (its compile, step and input times).
    """

    steps: Any
    executable: Any
    host_batch: dict
    train_images: np.ndarray
    build_steps: Callable
    chrono: Any
    seed: int
    dtype: str
    name: str = "breakdown"

    def run(self, state) -> dict:
        from bcjax.timing import breakdown

        batch = self.host_batch
        if "image" not in batch:  # the breakdown times a batch sent from the host
            batch = {**batch, "image": np.take(self.train_images, batch["index"], axis=0)}
        chrono = self.chrono
        result = breakdown.from_run(
            self.steps,
            self.executable,
            state,
            batch,
            jax.random.key(self.seed),
            compile_times=chrono.compile_s,
            step_times=chrono.step_times(),
            input_wait_s=chrono.input_wait_s[chrono.warmup_steps :],
            build=lambda collectives: self.build_steps(collectives=collectives),
            dtype=self.dtype,
        )
        log.info("Timing breakdown:\n%s", breakdown.format_summary(result))
        return result
