"""How much of bcjax one has to read to follow the training loop (issue 26's figures).

    python tools/house_metrics.py            # the loop's imports, the config's readers
    python tools/house_metrics.py --step     # also trace one epoch of a tiny run (~1 min)

Prints, in plain lines:

- ``loop_imports``: the bcjax modules a fresh ``python -c "import bcjax.train.loop"``
  has in ``sys.modules`` and their source lines (largest first).
- ``config_readers``: the files under bcjax/ that read ``config.<field>`` or
  ``cfg.<field>`` (attribute reads on those names, counted in the AST).
- with ``--step``: a tiny run (ResNet-18 width 4, 32 px, batch 8, 96 synthetic
  images, one device, validation and a checkpoint every epoch) is traced through
  its second epoch, from the loop asking for the epoch's first batch to the
  epoch's checkpoint being handed to Orbax. Every epoch runs the same code, so
  this is one training step followed from data to checkpoint. ``step_files``:
  the bcjax files whose code ran, with the distinct lines that ran in each
  (``sys.settrace``, main thread). ``run_loaded``: the bcjax modules loaded by the
  end of that epoch (set-up included), i.e. what a plain run needs, against
  ``loop_imports``, which is what importing the loop costs.

Run it from the repository root; it writes only into a temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

_LOADED = """
import json, sys
import bcjax.train.loop
print(json.dumps(sorted(
    (name, getattr(m, "__file__", None)) for name, m in list(sys.modules.items())
    if name == "bcjax" or name.startswith("bcjax.")
)))
"""


def _lines(path: str | None) -> int:
    if not path:
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _print_modules(label: str, modules: list[tuple[str, str | None]]) -> None:
    rows = sorted(((_lines(f), name) for name, f in modules), reverse=True)
    print(f"{label}: {len(rows)} modules, {sum(n for n, _ in rows)} lines")
    for n, name in rows:
        print(f"  {n:6d}  {name}")


def loop_imports() -> list[tuple[str, str | None]]:
    """(module, file) of every bcjax module a fresh interpreter holds after importing the loop."""
    out = subprocess.run(
        [sys.executable, "-c", _LOADED], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [tuple(row) for row in json.loads(out)]


def config_readers() -> dict[str, int]:
    """{file: attribute reads on the names `config`/`cfg`} for the files under bcjax/."""
    counts = {}
    for path in sorted((ROOT / "bcjax").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        n = sum(
            1
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("config", "cfg")
        )
        if n:
            counts[str(path.relative_to(ROOT))] = n
    return counts


def trace_one_epoch() -> tuple[dict[str, set[int]], list[tuple[str, str | None]]]:
    """({file: lines run} over a tiny run's second epoch, modules loaded by then)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bcjax-house-"))
    os.environ["BCJAX_CACHE_DIR"] = str(tmp / "cache")  # the synthetic set, not the user's
    sys.path.insert(0, str(ROOT))
    from bcjax.train import loop
    from configs import quickstart

    config = quickstart.get_config()
    config.update(
        {
            "dataset": "synthetic",
            "synthetic_num": 96,
            "width": 4,
            "image_size": 32,
            "global_batch_size": 8,
            "num_epochs": 3,
            "warmup_epochs": 1,
            "eval_every_epochs": 1,
            "checkpoint_every_epochs": 1,
            "timing_breakdown": False,
            "clinical_report": False,
        }
    )
    package = str(ROOT / "bcjax")
    ran: dict[str, set[int]] = {}

    def local(frame, event, arg):
        if event == "line":
            ran[frame.f_code.co_filename].add(frame.f_lineno)
        return local

    def global_trace(frame, event, arg):
        name = frame.f_code.co_filename
        if not name.startswith(package):
            return None
        ran.setdefault(name, set()).add(frame.f_lineno)
        return local

    loaded = []

    def on_epoch_end(record):
        if record["epoch"] == 1:  # epoch 2 starts with the next batch
            sys.settrace(global_trace)
            return False
        sys.settrace(None)
        loaded.extend(
            (name, getattr(m, "__file__", None))
            for name, m in list(sys.modules.items())
            if name == "bcjax" or name.startswith("bcjax.")
        )
        return True  # stop as a kill would: no test, no outputs

    try:
        loop.train_and_evaluate(config, tmp / "run", on_epoch_end=on_epoch_end)
    except loop.Interrupted:
        pass
    # The callback's own lines are not part of the trip.
    ran.pop(__file__, None)
    return ran, sorted(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="also trace one epoch of a tiny run")
    args = parser.parse_args()
    _print_modules("loop_imports", loop_imports())
    readers = config_readers()
    print(f"config_readers: {len(readers)} files, {sum(readers.values())} reads")
    for path, n in sorted(readers.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {path}")
    if args.step:
        ran, loaded = trace_one_epoch()
        files = sorted(((len(lines), f) for f, lines in ran.items()), reverse=True)
        print(f"step_files: {len(files)} files, {sum(n for n, _ in files)} lines run")
        for n, f in files:
            print(f"  {n:6d}  {pathlib.Path(f).relative_to(ROOT)}")
        _print_modules("run_loaded", loaded)


if __name__ == "__main__":
    main()
