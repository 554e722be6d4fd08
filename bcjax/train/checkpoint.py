"""Orbax checkpoints of a run: train state, data-iterator state and metadata.

Layout: ``<directory>/<step>/{state,data_iter,extra}`` plus Orbax's root
metadata (the run's identity, bcjax.specs.identity, and its config).

Retention uses Orbax preservation policies: the latest ``keep_latest``
checkpoints AND the best ``keep_best`` by a validation metric are kept.
(The legacy ``max_to_keep`` + ``best_fn`` keeps only the best N, so the
newest checkpoint, the one a restart needs, can be deleted.)

Saving is asynchronous: ``save`` returns once the arrays are copied off the
devices (the state may then be donated to the next step) and the files are
written in the background; ``wait_until_finished`` blocks until they are. On a
CPU run of one process the copy is one host copy of the whole state, and
Orbax's own save call (its Python work per array, ≈ 25–80 ms for ResNet-18's
166 arrays) runs on a background thread too, off the training loop's path;
every other method first waits for that call (BUILD_NOTES, #23 session 10).
That host copy of the best checkpoint so far is kept, and ``restore`` of that
step places it on the devices instead of reading the files back.

Restoring takes a target state (or abstract state) whose leaves carry the
CURRENT shardings, so a checkpoint written on 8 devices restores onto 1 or 4.
Multi-process: every process must call ``save`` and ``restore``; Orbax writes
each array once and the JSON items from process 0 only.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bcjax import specs
from bcjax.train.early_stopping import minimised

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint directory holds a run of another model."""


def _json_safe(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def run_metadata(config, *, class_names=None) -> dict:
    """Metadata saved with the checkpoints: the whole config plus the run's identity
    (bcjax.specs.identity: the model, and what a step number means). ``config``: a
    ConfigDict, a dict (an older run's, completed by the defaults) or bcjax.specs.Specs.

    Identities are compared on the keys both sides have, so the checkpoints of
    runs written before a field existed still resume.
    class_names: the classes as read from the data, in label order.
    """
    run_specs = config if isinstance(config, specs.Specs) else specs.from_config(config)
    return {
        "identity": _json_safe(specs.identity(run_specs, class_names=class_names)),
        "config": _json_safe(run_specs.config),
    }


def check_identity(saved: Mapping | None, current: Mapping | None) -> None:
    """Raise CheckpointMismatchError when two metadata identities differ."""
    a = (saved or {}).get("identity") or {}
    b = (current or {}).get("identity") or {}
    diff = {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}
    if diff:
        detail = ", ".join(
            f"{k}: checkpoint {v[0]!r} vs config {v[1]!r}" for k, v in sorted(diff.items())
        )
        raise CheckpointMismatchError(
            f"The checkpoints belong to another run ({detail}); use another workdir, "
            "or pass --config.fresh_start=True to move the old run aside and start afresh."
        )


def _encode_iter_state(state: Any) -> dict:
    # Grain's dataset iterators give a JSON-able dict; older DataLoader
    # iterators give bytes.
    if state is None:
        return {"kind": "none"}
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    return {"kind": "json", "value": _json_safe(state)}


def _decode_iter_state(payload: Mapping) -> Any:
    kind = payload.get("kind")
    if kind == "bytes":
        return base64.b64decode(payload["value"])
    if kind == "json":
        return payload["value"]
    return None


def _abstract(target: Any) -> Any:
    """ShapeDtypeStructs with the target's shardings: restore places every
    array straight onto the current mesh."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                "restore target leaves need a sharding: pass a state created "
                "on the current mesh (create_train_state / place_state)."
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, target)


def _metric_value(metrics: Mapping | None, name: str) -> float | None:
    if not metrics or metrics.get(name) is None:
        return None
    value = float(np.asarray(metrics[name]))
    return value if np.isfinite(value) else None


def _drop_torn_root_metadata(directory: pathlib.Path) -> None:
    """Deletes a run identity file left empty or torn by a process killed while writing it.

    Orbax writes ``metadata/_ROOT_METADATA`` once, at a run's first start, with a
    plain (not atomic) write; after a kill at that moment every restart failed
    with "Failed to read metadata". It precedes every checkpoint, so a torn one
    guards no checkpoint: Orbax writes it again from the current config.
    """
    path = directory / "metadata" / "_ROOT_METADATA"
    if jax.process_index() != 0 or not path.is_file():
        return  # the other processes read it only after process 0 has rewritten it
    try:
        json.loads(path.read_bytes())
        return
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        pass
    log.warning(
        "The run identity %s is unreadable (the first start was interrupted while writing it); "
        "writing it again from the current config.",
        path,
    )
    path.unlink()


def saves_from_host_copy(platform: str, process_count: int, async_save: bool) -> bool:
    """Whether ``save`` copies the state to the host and hands Orbax's save call to a
    background thread: CPU runs of one process only. Accelerators keep Orbax's own
    device-to-host transfer; several processes keep their save calls in step with
    each other (Orbax synchronises them)."""
    return async_save and platform == "cpu" and process_count == 1


def committed_steps(directory) -> list[int]:
    """The steps of the finished checkpoints in ``directory`` (none while one is being written)."""
    directory = pathlib.Path(directory)
    return ocp.step.checkpoint_steps(directory) if directory.is_dir() else []


def saved_metadata(directory) -> dict | None:
    """The run metadata written at a checkpoint directory's root, read without
    Orbax (None when absent or unreadable), e.g. to decide on fresh_start
    before anything of the old run is loaded."""
    path = pathlib.Path(directory) / "metadata" / "_ROOT_METADATA"
    try:
        root = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    custom = root.get("custom_metadata") if isinstance(root, dict) else None
    return dict(custom) if custom else None


class CheckpointManager:
    """Keeps a run's checkpoints; see the module docstring.

    Args:
      directory: where checkpoints live (created).
      keep_latest: newest checkpoints always kept (>= 1).
      keep_best: best checkpoints by ``best_metric`` also kept (0: none).
      best_metric: key of the ``metrics`` dict given to ``save``.
      best_mode: "max" or "min"; default as early stopping decides (``minimised``).
      metadata: JSON-able dict (``run_metadata(config)``); written once at the
        directory root and compared (``check_identity``) with what is there.
      async_save: write in a background thread (on a CPU run of one process, the
        save call's own work too: ``saves_from_host_copy``).
    Raises CheckpointMismatchError when the directory holds another model.
    """

    def __init__(
        self,
        directory,
        *,
        keep_latest: int = 2,
        keep_best: int = 1,
        best_metric: str = "accuracy",
        best_mode: str | None = None,
        metadata: Mapping | None = None,
        async_save: bool = True,
    ):
        if keep_latest < 1:
            raise ValueError(
                f"keep_latest must be >= 1 (a restart needs the newest), got {keep_latest}."
            )
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}.")
        if best_mode is None:
            best_mode = "min" if minimised(best_metric) else "max"
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        self.directory = pathlib.Path(directory).expanduser().resolve()
        self.best_metric = best_metric
        self.best_mode = best_mode
        if metadata is not None:
            _drop_torn_root_metadata(self.directory)
        policies = [pp.LatestN(n=keep_latest)]
        if keep_best:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store the metrics and answer best_step();
            # deletion is decided by the preservation policy alone.
            best_fn=lambda m: m[best_metric],
            best_mode=best_mode,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data_iter", "extra"),
            metadata=_json_safe(dict(metadata)) if metadata is not None else None,
        )
        self._saver = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bcjax-checkpoint")
            if saves_from_host_copy(jax.default_backend(), jax.process_count(), async_save)
            else None
        )
        self._pending: concurrent.futures.Future | None = None
        # (step, metric, host state, iterator payload, extra) of the best save so far.
        self._best_copy: tuple | None = None
        if metadata is not None:
            check_identity(self.metadata(), metadata)

    def _finish_save_call(self) -> None:
        """Waits for the save call running on the background thread (its files may
        still be being written by Orbax); raises what it raised."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    # -- queries ------------------------------------------------------------------
    def metadata(self) -> dict | None:
        """The run metadata at the directory root (None when absent)."""
        self._finish_save_call()
        root = self._manager.metadata()
        custom = getattr(root, "custom_metadata", None)
        return dict(custom) if custom else None

    def all_steps(self) -> list[int]:
        self._finish_save_call()
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        self._finish_save_call()
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step with the best saved metric; the latest when none has one
        (e.g. an empty validation split or NaN metrics)."""
        self._finish_save_call()
        best = self._manager.best_step()
        return self.latest_step() if best is None else best

    # -- save / restore -----------------------------------------------------------
    def save(
        self,
        step: int,
        state,
        data_iter_state: Any = None,
        *,
        metrics: Mapping | None = None,
        extra: Mapping | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (+ iterator state, + JSON-able ``extra``) at ``step``.

        ``metrics``: any dict containing ``best_metric`` (e.g. the validation
        report); only that value is kept for ranking. A checkpoint without it
        is kept only while among the latest. ``data_iter_state``: what the
        iterator's ``get_state()`` returns (dict or bytes); process 0's is
        stored, which assumes every process's iterator is at the same global
        position (true for ``bcjax.data.pipeline``). Returns whether saved (on the
        background thread: whether the save was started; an error it meets is raised
        by the next call of this manager).
        """
        value = _metric_value(metrics, self.best_metric)
        if self._saver is not None:
            # As Orbax's own save call does: the checkpoints before this one are committed
            # first, so at most one is ever in flight (a kill loses no more than that one).
            self.wait_until_finished()
            if not force and not self._manager.should_save(int(step)):
                return False
            state = jax.device_get(state)  # one copy; the device arrays may be donated now
        iter_payload = _encode_iter_state(data_iter_state)
        extra_payload = _json_safe(dict(extra or {}))
        if self._saver is not None and self._improves(value):
            self._best_copy = (int(step), value, state, iter_payload, extra_payload)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(iter_payload),
            extra=ocp.args.JsonSave(extra_payload),
        )
        save = functools.partial(
            self._manager.save,
            int(step),
            args=args,
            force=force,
            metrics=None if value is None else {self.best_metric: value},
        )
        if self._saver is None:
            return save()
        self._pending = self._saver.submit(save)
        return True

    def _improves(self, value: float | None) -> bool:
        if value is None:
            return False
        if self._best_copy is None:
            return True
        best = self._best_copy[1]  # a tie: Orbax's best step is the later one
        return value <= best if self.best_mode == "min" else value >= best

    def _placed_best_copy(self, step: int, target) -> tuple[Any, Any, dict] | None:
        """``restore``'s answer from the host copy kept at ``save``, when it is of
        ``step`` and has the target's structure, shapes and dtypes; else None."""
        if self._best_copy is None or self._best_copy[0] != step:
            return None
        _, _, host_state, iter_payload, extra_payload = self._best_copy
        abstract = _abstract(target)
        if jax.tree.structure(host_state) != jax.tree.structure(abstract) or any(
            (h.shape, h.dtype) != (a.shape, a.dtype)
            for h, a in zip(jax.tree.leaves(host_state), jax.tree.leaves(abstract))
        ):
            return None
        state = jax.device_put(host_state, jax.tree.map(lambda a: a.sharding, abstract))
        return state, _decode_iter_state(iter_payload), dict(extra_payload)

    def restore(self, step: int, target) -> tuple[Any, Any, dict]:
        """``(state, data_iter_state, extra)`` of ``step``, placed like ``target``.

        ``target``: a state on the current mesh (e.g. a fresh
        ``create_train_state``), or its abstract version with shardings. The best
        checkpoint this manager saved comes from its host copy (the same arrays);
        any other is read from the files.
        """
        self._finish_save_call()
        held = self._placed_best_copy(int(step), target)
        if held is not None:
            return held
        self.wait_until_finished()  # a pending write of the same step
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target)),
                data_iter=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return (
            restored["state"],
            _decode_iter_state(restored["data_iter"] or {}),
            dict(restored["extra"] or {}),
        )

    def restore_latest(self, target) -> tuple[Any, Any, dict] | None:
        """``restore`` of the latest step; None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, target)

    def restore_best(self, target) -> tuple[Any, Any, dict] | None:
        """``restore`` of the best step; None when there is none."""
        step = self.best_step()
        return None if step is None else self.restore(step, target)

    def wait_until_finished(self) -> None:
        self._finish_save_call()
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._finish_save_call()
        finally:
            if self._saver is not None:
                self._saver.shutdown()
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_variables(directory, step: int | None = None) -> dict:
    """``{"params", "batch_stats"}`` of a checkpoint as host numpy arrays, what
    ``model.apply`` needs for inference, without a target or a mesh; ``step``
    None: the latest. FileNotFoundError when there is no such checkpoint."""
    directory = pathlib.Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoint directory {directory}.")
    # Handlers for every item, so Orbax does not warn about the ones left unread.
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data_iter": ocp.JsonCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {directory}.")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {directory}; it holds steps {steps}."
            )
        meta = manager.item_metadata(step)["state"]
        # A model without BatchNorm saves no batch_stats entry (or an empty one).
        names = [k for k in ("params", "batch_stats") if k in meta and jax.tree.leaves(meta[k])]
        abstract = {k: jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta[k]) for k in names}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=jax.tree.map(
                        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract
                    ),
                    partial_restore=True,
                )
            ),
        )
        variables = {k: restored["state"][k] for k in names}
        variables.setdefault("batch_stats", {})
        return variables
    finally:
        manager.close()


def read_params(directory, step: int | None = None) -> Any:
    """The params of a checkpoint as host numpy arrays, without a target
    (for tests and inspection); ``step`` None: the latest."""
    return read_variables(directory, step)["params"]
