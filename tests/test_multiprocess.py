"""2 processes x 4 CPU devices over 127.0.0.1 (jax.distributed, gloo) train
like 1 process x 8 devices with each strategy, and write a checkpoint that
restores here."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from _mp_worker import initial_state_host, run_cached

from bcjax.parallel.mesh import make_mesh

WORKER = pathlib.Path(__file__).with_name("_mp_worker.py")
REPO = WORKER.parents[1]
MODEL = "tiny_cnn"
TIMEOUT_S = 150
TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, num_processes=2, devices_per_process=4):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    procs, logs = [], []
    for pid in range(num_processes):
        log = open(out / f"worker_{pid}.log", "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--process_id",
                    str(pid),
                    "--num_processes",
                    str(num_processes),
                    "--port",
                    str(port),
                    "--out",
                    str(out),
                    "--model",
                    MODEL,
                ],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:  # never leave a worker behind (one hung collective hangs both)
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for pid, log in enumerate(logs):
        log.seek(0)
        texts.append(f"--- worker {pid} ---\n" + log.read()[-3000:])
        log.close()
    assert codes is not None, f"workers still running after {TIMEOUT_S} s\n" + "\n".join(texts)
    assert codes == [0] * num_processes, f"exit codes {codes}\n" + "\n".join(texts)


def test_two_processes_match_one_process_of_eight_devices(tmp_path):
    _launch(tmp_path)
    ref = run_cached("shard_map", 8, MODEL)  # this process: 8 devices
    results = [np.load(tmp_path / f"result_{pid}.npz") for pid in range(2)]
    flat_ref = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(ref["params"])
    }
    for r in results:
        assert int(r["process_count"]) == 2 and int(r["device_count"]) == 8
        for strategy in ("shard_map", "pmap", "jit"):
            assert bool(r[f"{strategy}_gathered_equals_sent"]), (
                strategy
            )  # images kept on the devices
            np.testing.assert_allclose(
                r[f"{strategy}_losses"], ref["losses"], err_msg=strategy, **TOL
            )
            # Eval outputs are gathered: each process holds the whole batch.
            np.testing.assert_allclose(
                r[f"{strategy}_logits"], ref["logits"], err_msg=strategy, **TOL
            )
            for key, value in flat_ref.items():
                np.testing.assert_allclose(
                    r[f"{strategy}_param_" + key], value, err_msg=f"{strategy} {key}", **TOL
                )
    # The 2-process checkpoint (of the pmap run) restores onto this process's 8 and 1 devices.
    from _mp_worker import build

    from bcjax.train import checkpoint

    with checkpoint.CheckpointManager(tmp_path / "ckpt") as ckpt:
        for n in (8, 1):
            target = build("shard_map", make_mesh(n), MODEL).place_state(initial_state_host(MODEL))
            state, iter_state, extra = ckpt.restore_latest(target)
            assert int(state.step) == 3 and iter_state == {"next": 3}
            np.testing.assert_allclose(extra["losses"], ref["losses"], **TOL)
            for path, x in jax.tree_util.tree_leaves_with_path(state.params):
                np.testing.assert_allclose(
                    np.asarray(x), flat_ref[jax.tree_util.keystr(path)], **TOL
                )
