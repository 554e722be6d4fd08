"""bcjax's training step on the CPU with and without the XLA:CPU convolution fix, beside PyTorch.

    python tools/cpu_step_bench.py --torch-python "$TORCH_VENV/bin/python" \\
        --out cpu_step_bench.jsonl

(any Python with torch installed, e.g. a separate virtual environment; the
BCJAX_TORCH_PYTHON environment variable is the default for --torch-python).

For each case (model, width, image size; batch 32) it builds the step a run
builds (bcjax.parallel.strategies.build_steps, "shard_map" on a 1-device mesh,
normalisation on device; no augmentation unless --augment: a run's step
augments, which costs more on XLA:CPU, see BUILD_NOTES) twice: with the models' default
``cpu_conv=True`` ("fixed": layers.cpu_friendly_conv and layers.max_pool) and
with ``cpu_conv=False`` ("unfixed", plain lax.conv_general_dilated and
nn.max_pool). PyTorch's step runs in a separate process
(tools/torch_cpu_step.py) with its own Python. The three are timed in rounds,
each round running every variant for about --round-s seconds in a rotating
order (A B C, B C A, ...), so that load from other work on the machine falls on
all of them; medians over all timed steps. Writes one JSON line per case and a
Markdown table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_CASES = (
    "resnet18:16:64,resnet18:64:64,resnet18:64:224,mobilenet_v2:1.0:64,mobilenet_v2:1.0:224"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--cases",
        default=DEFAULT_CASES,
        help="model:width:size, comma separated (width: ResNet stem width or "
        "MobileNet width multiplier)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--round-s",
        type=float,
        default=4.0,
        help="seconds each variant runs per round (at least one step)",
    )
    p.add_argument(
        "--variants",
        default="fixed,unfixed,torch",
        help="fixed, unfixed, torch; a bcjax variant with '+aug' appended (fixed+aug) "
        "augments as a run does, so one sitting times the step with and without",
    )
    p.add_argument(
        "--torch-python",
        default=os.environ.get("BCJAX_TORCH_PYTHON"),
        help="a Python with torch (torchvision too for mobilenet_v2); omit to skip "
        "PyTorch (default: $BCJAX_TORCH_PYTHON)",
    )
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    p.add_argument(
        "--augment",
        action="store_true",
        help="bcjax's step with the default on-device augmentation, as a run trains "
        "(PyTorch's step has none)",
    )
    p.add_argument("--out", default=None, help="append one JSON line per case here")
    return p.parse_args(argv)


class BcjaxStep:
    """A compiled bcjax train step and its (donated) state."""

    def __init__(
        self, name: str, width: float, size: int, batch: int, cpu_conv: bool, augment: bool = False
    ):
        import jax
        import jax.numpy as jnp

        import bcjax.models
        from bcjax.benchmark import random_batch
        from bcjax.parallel import mesh as mesh_lib
        from bcjax.parallel import strategies
        from bcjax.step import optim
        from bcjax.step import state as state_lib

        kw = {"width": int(width)} if name.startswith("resnet") else {"width_multiplier": width}
        mesh = mesh_lib.make_mesh(1)
        model = bcjax.models.create(name, num_classes=3, dtype=jnp.float32, cpu_conv=cpu_conv, **kw)
        tx, _ = optim.make_optimizer(
            steps_per_epoch=100, num_epochs=1, optimizer="sgd", learning_rate=0.01, momentum=0.9
        )
        self.state = state_lib.create_train_state(model, tx, 0, size, mesh)
        # augment_cfg={} is the default augmentation (configs/default.py's, through
        # bcjax.data.augment.settings).
        steps = strategies.build_steps(
            "shard_map", mesh, model, augment_cfg={} if augment else None
        )
        self.batch = steps.shard_batch(random_batch(batch, size))
        self.rng = jax.random.key(0)
        t0 = time.perf_counter()
        self.lowered = steps.train_step.lower(self.state, self.batch, self.rng)
        self.compiled = self.lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self._block = jax.block_until_ready
        self.run(1)  # first execution (allocations) not timed

    def run(self, n: int) -> list:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch, self.rng)
            self._block((self.state, metrics))
            times.append(time.perf_counter() - t0)
        return times


class TorchStep:
    """tools/torch_cpu_step.py in its own process, driven one batch of steps at a time."""

    def __init__(self, python: str, name: str, width: float, size: int, batch: int, threads: int):
        script = pathlib.Path(__file__).with_name("torch_cpu_step.py")
        cmd = [
            python,
            str(script),
            "--model",
            name,
            "--size",
            str(size),
            "--batch",
            str(batch),
            "--threads",
            str(threads),
        ]
        if name.startswith("resnet"):
            cmd += ["--width", str(int(width))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())
        self.compile_s = None

    def run(self, n: int) -> list:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["step_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def time_case(runners: dict, rounds: int, round_s: float) -> dict:
    """Rotating-order rounds; returns every timed step per variant."""
    names = list(runners)
    per_step = {k: runners[k].run(1)[0] for k in names}  # also a warm-up step each
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            n = max(1, int(round_s / max(per_step[k], 1e-3)))
            times[k] += runners[k].run(n)
            per_step[k] = statistics.median(times[k])
    return times


def summarize(case: str, times: dict, runners: dict, load: tuple) -> dict:
    out = {"case": case, "load_avg_1m_start_end": load}
    for k, ts in times.items():
        s = sorted(ts)
        out[k] = {
            "median_ms": 1e3 * statistics.median(ts),
            "p10_ms": 1e3 * s[len(s) // 10],
            "p90_ms": 1e3 * s[(9 * len(s)) // 10],
            "steps": len(ts),
            "compile_s": runners[k].compile_s,
        }
    med = {k: out[k]["median_ms"] for k in times}
    if "torch" in med:
        for k in ("fixed", "unfixed"):
            if k in med:
                out[f"{k}_over_torch"] = med[k] / med["torch"]
    if "fixed" in med and "unfixed" in med:
        out["speedup_fixed_vs_unfixed"] = med["unfixed"] / med["fixed"]
    for k in ("fixed", "unfixed"):
        if k in med and f"{k}+aug" in med:
            out[f"{k}_aug_over_no_aug"] = med[f"{k}+aug"] / med[k]
    return out


def markdown(rows: list) -> str:
    head = (
        "| case | bcjax fixed ms | bcjax unfixed ms | PyTorch ms | fixed / PyTorch "
        "| unfixed / PyTorch | unfixed / fixed | compile fixed / unfixed s | fixed+aug ms |"
    )
    lines = [head, "|" + "---|" * 9]
    f = lambda v, fmt="{:.0f}": "–" if v is None else fmt.format(v)  # noqa: E731
    for r in rows:
        med = lambda k, r=r: r.get(k, {}).get("median_ms")  # noqa: E731
        comp = lambda k, r=r: r.get(k, {}).get("compile_s")  # noqa: E731
        lines.append(
            f"| {r['case']} | {f(med('fixed'))} | {f(med('unfixed'))} | {f(med('torch'))} "
            f"| {f(r.get('fixed_over_torch'), '{:.2f}')} "
            f"| {f(r.get('unfixed_over_torch'), '{:.2f}')} "
            f"| {f(r.get('speedup_fixed_vs_unfixed'), '{:.2f}')} "
            f"| {f(comp('fixed'), '{:.1f}')} / {f(comp('unfixed'), '{:.1f}')} "
            f"| {f(med('fixed+aug'), '{:.1f}')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if args.torch_python is None and "torch" in variants:
        variants.remove("torch")
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "variants": variants,
            }
        ),
        flush=True,
    )
    rows = []
    for case in args.cases.split(","):
        name, width, size = case.split(":")
        width, size = float(width), int(size)
        load0 = os.getloadavg()[0]
        runners = {}
        for v in variants:
            if v == "torch":
                runners[v] = TorchStep(
                    args.torch_python, name, width, size, args.batch, args.threads
                )
            else:
                base = v.removesuffix("+aug")
                runners[v] = BcjaxStep(
                    name,
                    width,
                    size,
                    args.batch,
                    cpu_conv=base == "fixed",
                    augment=args.augment or v.endswith("+aug"),
                )
        try:
            times = time_case(runners, args.rounds, args.round_s)
        finally:
            if "torch" in runners:
                runners["torch"].close()
        row = summarize(
            f"{name} w{width:g} {size}px b{args.batch}",
            times,
            runners,
            (round(load0, 2), round(os.getloadavg()[0], 2)),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        del runners
    print(markdown(rows))


if __name__ == "__main__":
    main()
