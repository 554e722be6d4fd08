"""Shared by the training tests: tiny models, fixed batches, a cached runner;
run as a script it is one process of the multi-process test.

Script use (the launcher sets XLA_FLAGS/JAX_PLATFORMS in the environment):
    python tests/_mp_worker.py --process_id 0 --num_processes 2 --port 12345 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 32
GLOBAL_BATCH = 16
NUM_STEPS = 3
RNG_SEED = 7


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Dense: compiles in a second or two,
    for the tests where the model is beside the point."""

    num_classes: int = 3
    bn_axis_name: str | None = None
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(2, 2), dtype=self.dtype)(jnp.asarray(x, self.dtype))
        x = nn.BatchNorm(
            use_running_average=not train,
            axis_name=self.bn_axis_name,
            momentum=0.9,
            dtype=self.dtype,
        )(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def make_model(name: str):
    """ "tiny_resnet": bcjax's ResNet code (BasicBlock, projection shortcut,
    BatchNorm) cut to two stages of one block at width 4; ResNet-18 itself
    compiles ~4x slower with no extra coverage of the step logic."""
    if name == "tiny_cnn":
        return TinyCNN()
    if name == "tiny_resnet":
        from bcjax.models.resnet import BasicBlock, ResNet

        return ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, num_classes=3)
    import bcjax.models

    return (
        bcjax.models.create(name, num_classes=3, width=4)
        if name.startswith("resnet")
        else bcjax.models.create(name, num_classes=3, width_multiplier=0.25, dropout_rate=0.0)
    )


def make_batches(
    num: int = NUM_STEPS, global_batch: int = GLOBAL_BATCH, seed: int = 0
) -> list[dict]:
    rs = np.random.RandomState(seed)
    return [
        {
            "image": rs.randint(0, 256, (global_batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8),
            "label": rs.randint(0, 3, global_batch).astype(np.int32),
            "index": (np.arange(global_batch) + i * global_batch).astype(np.int32),
        }
        for i in range(num)
    ]


def local_rows(batch: dict, process_index: int, process_count: int) -> dict:
    """This process's contiguous slice of a global batch (as the data pipeline gives)."""
    n = len(batch["label"]) // process_count
    return {k: v[process_index * n : (process_index + 1) * n] for k, v in batch.items()}


def make_tx():
    from bcjax.step.optim import make_optimizer

    # Exercises the whole chain: clipping, masked coupled weight decay, momentum.
    return make_optimizer(
        steps_per_epoch=2,
        num_epochs=2,
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        clip_norm=1.0,
    )[0]


def simple_preprocess(images, keys):
    """Cheap stand-in for augmentation: a per-example random flip."""
    x = images.astype(jnp.float32) / 255.0
    flip = jax.vmap(jax.random.bernoulli)(keys)
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)


def simple_normalize(images):
    return images.astype(jnp.float32) / 255.0


def to_host(tree):
    """numpy copy of a replicated tree (works on multi-process arrays too)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


@functools.cache
def initial_state_host(model_name: str):
    """Initial state as host arrays, made once; every run starts from a copy."""
    from bcjax.parallel.mesh import make_mesh
    from bcjax.step.state import create_train_state

    state = create_train_state(make_model(model_name), make_tx(), 0, IMAGE_SIZE, make_mesh(1))
    return state.replace(
        **{k: to_host(getattr(state, k)) for k in ("step", "params", "batch_stats", "opt_state")}
    )


def build(
    strategy: str,
    mesh,
    model_name: str,
    *,
    bn_sync: bool = True,
    collectives: bool = True,
    augment: bool = False,
    **kw,
):
    from bcjax.parallel.strategies import build_steps

    if augment:
        kw.update(augment_cfg={})  # bcjax.data.augment with its defaults
    else:
        kw.update(preprocess=simple_preprocess, normalize=simple_normalize)
    return build_steps(
        strategy, mesh, make_model(model_name), bn_sync=bn_sync, collectives=collectives, **kw
    )


def run(steps, state, batches, process_index: int = 0, process_count: int = 1, aot_steps: int = 0):
    """Train on ``batches`` (global numpy batches); returns (losses, state, metrics list).

    The first ``aot_steps`` steps go through ``train_step.lower(...).compile()``
    (as the training loop does), the rest through ``train_step`` itself.
    """
    rng = jax.random.key(RNG_SEED)
    losses, all_metrics = [], []
    compiled = None
    for i, batch in enumerate(batches):
        sharded = steps.shard_batch(local_rows(batch, process_index, process_count))
        if i < aot_steps:
            compiled = compiled or steps.train_step.lower(state, sharded, rng).compile()
            state, metrics = compiled(state, sharded, rng)
        else:
            state, metrics = steps.train_step(state, sharded, rng)
        metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
        losses.append(metrics["loss"])
        all_metrics.append(metrics)
    return np.asarray(losses), state, all_metrics


@functools.cache
def run_cached(
    strategy: str,
    num_devices: int,
    model_name: str = "tiny_resnet",
    *,
    bn_sync: bool = True,
    collectives: bool = True,
    augment: bool = False,
):
    """Losses, final params/batch_stats and eval logits on the first batch, all
    as numpy; cached so test modules share compilations."""
    from bcjax.parallel.mesh import make_mesh

    mesh = make_mesh(num_devices)
    steps = build(
        strategy, mesh, model_name, bn_sync=bn_sync, collectives=collectives, augment=augment
    )
    batches = make_batches()
    losses, state, metrics = run(steps, steps.place_state(initial_state_host(model_name)), batches)
    logits = np.asarray(steps.eval_step(state, steps.shard_batch(batches[0]))["logits"])
    return {
        "losses": losses,
        "params": to_host(state.params),
        "batch_stats": to_host(state.batch_stats),
        "logits": logits,
        "metrics": metrics,
    }


def main(argv=None) -> int:
    """One process of the multi-process test: shard_map steps on the global
    mesh, its results and an Orbax checkpoint written to --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="tiny_resnet")
    args = parser.parse_args(argv)

    from bcjax.parallel import mesh as mesh_lib

    mesh_lib.maybe_init_distributed(
        f"127.0.0.1:{args.port}", args.num_processes, args.process_id, initialization_timeout=90
    )
    from bcjax.step.state import create_train_state
    from bcjax.train import checkpoint

    mesh = mesh_lib.make_mesh()
    # Built in this process on the global mesh (not copied from a host): the
    # same seed must give the same parameters as a single process.
    init = to_host(create_train_state(make_model(args.model), make_tx(), 0, IMAGE_SIZE, mesh))
    batches = make_batches()
    out = pathlib.Path(args.out)
    results = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    # The images of all batches as one table (a batch's "index" is its row):
    # kept on the devices, a batch gathered there must equal the one sent.
    from bcjax.parallel import strategies

    add_images = strategies.on_device_images(np.concatenate([b["image"] for b in batches]), mesh)
    for strategy in ("shard_map", "pmap", "jit"):
        steps = build(strategy, mesh, args.model)
        rows = local_rows(batches[1], jax.process_index(), jax.process_count())
        sent = steps.shard_batch(rows)["image"]
        gathered = add_images(steps.shard_batch({k: v for k, v in rows.items() if k != "image"}))[
            "image"
        ]
        results[f"{strategy}_gathered_equals_sent"] = gathered.shape == sent.shape and all(
            a.device == b.device and np.array_equal(np.asarray(a.data), np.asarray(b.data))
            for a, b in zip(gathered.addressable_shards, sent.addressable_shards)
        )
        losses, state, _ = run(
            steps,
            steps.place_state(init),
            batches,
            jax.process_index(),
            jax.process_count(),
            aot_steps=2,
        )
        eval_rows = local_rows(batches[0], jax.process_index(), jax.process_count())
        results[f"{strategy}_losses"] = losses
        results[f"{strategy}_logits"] = np.asarray(
            steps.eval_step(state, steps.shard_batch(eval_rows))["logits"]
        )
        results.update(
            {
                f"{strategy}_param_" + jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_leaves_with_path(to_host(state.params))
            }
        )
        if strategy == "pmap":
            with checkpoint.CheckpointManager(out / "ckpt", keep_latest=1, keep_best=0) as ckpt:
                ckpt.save(
                    int(state.step), state, {"next": NUM_STEPS}, extra={"losses": losses.tolist()}
                )
                ckpt.wait_until_finished()
    np.savez(out / f"result_{jax.process_index()}.npz", **results)
    print(json.dumps({"process": jax.process_index(), "losses": losses.tolist()}), flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
