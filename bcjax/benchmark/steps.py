"""One benchmark case: a model, its optimizer and a fresh TrainState on a mesh
(``_model_and_state``), a synthetic decoded batch (``random_batch``), and the
timed step with its compute/collective breakdown (``run_case``, through
bcjax.timing.breakdown.measure). JAX is imported on use, after the CLI has set
the device count.
"""

from __future__ import annotations

import pathlib

from bcjax.data import busi


def _model_kwargs(name: str, args) -> dict:
    """The width the command line gives the model's family; none = the zoo's default."""
    # Here: bcjax.models brings flax, and this module imports no JAX until a case runs.
    from bcjax.models import family

    knob = family.width_of(name, width=args.width, width_multiplier=args.width_multiplier)
    return {field: value for field, value in knob.items() if value is not None}


# The benchmark times BUSI's setting: its classes.
NUM_CLASSES = len(busi.CLASSES)


def random_batch(global_batch: int, image_size: int, seed: int = 0) -> dict:
    """Decoded uint8 images and labels, as the host pipeline hands them over."""
    import numpy as np

    rs = np.random.default_rng(seed)
    return {
        "image": rs.integers(0, 256, (global_batch, image_size, image_size, 3), dtype=np.uint8),
        "label": rs.integers(0, NUM_CLASSES, (global_batch,), dtype=np.int32),
        "index": np.arange(global_batch, dtype=np.int32),
    }


def _model_and_state(model_name: str, num_devices: int, args):
    """The model, its optimizer and a fresh TrainState on a mesh of num_devices."""
    import jax.numpy as jnp

    import bcjax.models
    from bcjax.parallel import mesh as mesh_lib
    from bcjax.step import optim
    from bcjax.step import state as state_lib

    mesh = mesh_lib.make_mesh(num_devices)
    model = bcjax.models.create(
        model_name,
        num_classes=NUM_CLASSES,
        dtype=jnp.dtype(args.dtype),
        **_model_kwargs(model_name, args),
    )
    tx, _ = optim.make_optimizer(
        steps_per_epoch=100, num_epochs=1, optimizer="sgd", learning_rate=0.01, momentum=0.9
    )
    return mesh, model, tx, state_lib.create_train_state(model, tx, 0, args.image_size, mesh)


def run_case(model_name: str, per_device_batch: int, num_devices: int, args) -> dict:
    """One model x batch x device count: the breakdown dict plus the case."""
    import jax

    from bcjax.parallel import strategies
    from bcjax.timing import breakdown

    mesh, model, tx, state = _model_and_state(model_name, num_devices, args)
    augment_cfg = None
    if args.augment:
        from bcjax.data import augment

        augment_cfg = augment.settings()

    def build(collectives: bool):
        return strategies.build_steps(
            args.strategy, mesh, model, augment_cfg=augment_cfg, collectives=collectives
        )

    batch = random_batch(per_device_batch * num_devices, args.image_size)
    profile_dir = None
    if args.profile:
        profile_dir = str(
            pathlib.Path(args.profile) / f"{model_name}_b{per_device_batch}_n{num_devices}"
        )
    return breakdown.measure(
        build,
        state,
        batch,
        jax.random.key(0),
        warmup=args.warmup,
        iters=args.steps,
        eval_step=False,
        allreduce=num_devices > 1,
        compile_cache=args.compile_cache,
        dtype=args.dtype,
        profile_dir=profile_dir,
    )
