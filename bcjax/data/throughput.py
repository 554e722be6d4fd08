"""Input pipeline throughput: host images/s after the first decode, and the first decode.

    python -m bcjax.data.throughput [--workers 0,1,2,4] [--image-size 224] [--data-dir BUSI]

Prints a table of host images/s per Grain worker-thread count, the one-off
decode+resize cost, and (with --augment) the on-device augmentation rate.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import tempfile
import time

import numpy as np

from bcjax.data import busi, pipeline


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _first_decode(image_size, data_dir, decode_images, seed):
    """(ArraySet, seconds, images decoded): real data when given, else a small synthetic set at
    BUSI sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            from bcjax.data import synthetic

            root = synthetic.generate(tmp, num=decode_images, seed=seed)
        else:
            root = data_dir
        examples = busi.scan(root, verify=False)
        start = time.perf_counter()
        arrays = pipeline.load_arrays(examples, image_size)
        return arrays, time.perf_counter() - start, len(examples)


def measure(
    image_size: int = 224,
    batch_size: int = 128,
    num_images: int = 780,
    workers: int = 2,
    *,
    steps: int = 60,
    data_dir=None,
    decode_images: int = 64,
    seed: int = 0,
    arrays=None,
) -> dict:
    """Host pipeline rate (images/s) of train_iterator with ``workers`` Grain threads.

    The decoded set is tiled to ``num_images`` rows (BUSI has 780) so that the
    gather works on a realistically sized array. ``arrays``: reuse a decoded
    ArraySet (skips and does not report the decode).
    """
    out = {"image_size": image_size, "batch_size": batch_size, "workers": workers, **machine()}
    if arrays is None:
        arrays, decode_s, decoded = _first_decode(image_size, data_dir, decode_images, seed)
        out.update(
            first_decode_s=round(decode_s, 3),
            decoded_images=decoded,
            decode_images_per_s=round(decoded / decode_s, 1),
            data="synthetic" if data_dir is None else str(data_dir),
        )
    reps = -(-num_images // len(arrays))
    idx = np.arange(reps * len(arrays))[:num_images] % len(arrays)
    data = arrays.subset(idx)
    it = pipeline.train_iterator(data, batch_size, seed, num_threads=workers)
    for _ in range(3):  # thread start-up and buffers filling are not the steady state
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, image_size, image_size, 3)
    out.update(
        num_images=num_images,
        steps=steps,
        images_per_s=round(steps * batch_size / elapsed, 1),
        batch_ms=round(1000 * elapsed / steps, 3),
    )
    return out


def measure_augment(image_size: int = 224, batch_size: int = 128, steps: int = 5, cfg=None) -> dict:
    """Device-side augmentation rate (jit, default backend) on random uint8 images."""
    import jax
    import jax.numpy as jnp

    from bcjax.data import augment

    images = jnp.asarray(
        np.random.default_rng(0).integers(
            0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8
        )
    )
    keys = jax.random.split(jax.random.key(0), batch_size)
    fn = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    start = time.perf_counter()
    fn(images, keys).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(images, keys)
    out.block_until_ready()
    elapsed = time.perf_counter() - start
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "image_size": image_size,
        "batch_size": batch_size,
        "compile_s": round(compile_s, 2),
        "images_per_s": round(steps * batch_size / elapsed, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bcjax.data.throughput", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", default="0,1,2,4", help="comma-separated Grain thread counts")
    ap.add_argument("--num-images", type=int, default=780)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--data-dir", default=None, help="BUSI folder/zip to decode (default: synthetic)"
    )
    ap.add_argument("--decode-images", type=int, default=64, help="synthetic images to decode")
    ap.add_argument("--augment", action="store_true", help="also time on-device augmentation")
    args = ap.parse_args(argv)
    arrays, decode_s, decoded = _first_decode(args.image_size, args.data_dir, args.decode_images, 0)
    m = machine()
    print(f"machine: {m['cpu_count']} CPUs, {m['cpu_model']}, {m['date']}")
    print(
        f"first decode+resize to {args.image_size}px: {decoded} images in {decode_s:.2f}s "
        f"({decoded / decode_s:.0f} images/s, once per data set; cached with "
        "load_arrays(cache_dir=...))"
    )
    print(f"\n| workers | images/s ({args.image_size}px, batch {args.batch_size}) | ms/batch |")
    print("|---:|---:|---:|")
    for w in [int(x) for x in args.workers.split(",")]:
        r = measure(
            args.image_size, args.batch_size, args.num_images, w, steps=args.steps, arrays=arrays
        )
        print(f"| {w} | {r['images_per_s']:,.0f} | {r['batch_ms']:.2f} |", flush=True)
    if args.augment:
        a = measure_augment(args.image_size, args.batch_size)
        print(
            f"\naugment on {a['device']}: {a['images_per_s']:,.0f} images/s "
            f"({args.image_size}px, batch {args.batch_size}; compile {a['compile_s']}s)"
        )


if __name__ == "__main__":
    main()
