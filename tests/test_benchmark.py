"""python -m bcjax.benchmark: tables from the breakdown, anchors, scaling-model
predictions, and the timed figures unit tests do not assert (clinical report, compile cache)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

from bcjax import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(model, batch, devices, compute_ms, img_s):
    row = {c: None for c in benchmark.COLUMNS}
    row.update(
        model=model,
        per_device_batch=batch,
        devices=devices,
        compute_ms=compute_ms,
        img_s_pipelined=img_s,
        gradient_mb=46.76,
    )
    return row


def test_cli_writes_csv_json_markdown(tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(
        '{"fw": "torch", "model": "resnet18", "batch": 2, "img_s": 10.0}\nnot json\n'
    )
    # One device: one compile (the collective-free variant and the all-reduce
    # are only built for several devices; tests/test_timing.py covers those).
    env = dict(os.environ)
    # The CLI's output, not CPU code quality, is under test: compile fast.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "bcjax.benchmark",
        "--models=resnet18",
        "--width=2",
        "--image-size=32",
        "--batch=2",
        "--devices=1",
        "--steps=2",
        "--warmup=1",
        "--dtype=float32",
        f"--out={out}",
        f"--anchors={anchors}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    assert "timings simulated" not in stdout  # one real CPU device
    assert "| model | devices |" in stdout and "img/s pipelined" in stdout
    assert "Ring all-reduce prediction" in stdout and "nvlink_h100" in stdout
    with open(out / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["model"] == "resnet18" and rows[0]["devices"] == "1"
    assert float(rows[0]["img_s"]) > 0 and float(rows[0]["compute_ms"]) == float(rows[0]["step_ms"])
    assert float(rows[0]["exposed_collective_ms"]) == 0 and float(rows[0]["compile_s"]) > 0
    assert float(rows[0]["gflop_per_device_step"]) > 0
    assert rows[0]["compile_cold_s"] == rows[0]["compile_warm_s"] == ""  # no --compile-cache
    saved = json.loads((out / "benchmark.json").read_text())
    assert not saved["simulated"] and saved["rows"][0]["error"] is None
    assert saved["breakdowns"][0]["num_devices"] == 1
    assert saved["anchors"][0]["ratio_vs_torch"] == round(
        float(rows[0]["img_s_pipelined"]) / 10.0, 2
    )
    assert {p["interconnect"] for p in saved["scaling_predictions"]} == {"pcie4", "nvlink_h100"}
    assert saved["ring_model"] == saved["scaling_predictions"]  # the old key, for old readers
    md = (out / "benchmark.md").read_text()
    assert "| resnet18 | 1 | 2 |" in md


def test_anchor_ratios_and_ring_predictions(tmp_path):
    anchors = tmp_path / "a.jsonl"
    anchors.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"fw": "torch", "model": "resnet18", "batch": 128, "img_s": 9305.0},
                {"fw": "jax-flax-linen", "model": "resnet18", "batch": 128, "img_s": 14265.0},
                {"fw": "torch", "model": "resnet18", "batch": 32, "img_s": 2361.0},
                {
                    "fw": "jax-flax-linen",
                    "model": "resnet18",
                    "batch": 32,
                    "img_s": 9179.0,
                    "compile_s": 10.0,
                },
            ]
        )
    )
    rows = [_row("resnet18", 32, 1, 3.0, 10000.0), _row("resnet18", 128, 1, 9.0, 14000.0)]
    table = benchmark.anchor_rows(rows, benchmark.load_anchors(str(anchors)))
    assert table[0]["ratio_vs_torch"] == round(10000 / 2361, 2)
    assert table[1]["ratio_vs_jax-flax-linen"] == round(14000 / 14265, 2)
    assert table[0]["torch+compile_img_s"] is None
    preds = benchmark.ring_predictions(rows, ["pcie4"])
    at8 = [p for p in preds if p["devices"] == 8 and "note" not in p]
    assert [p["per_device_batch"] for p in at8] == [32, 128]
    # The all-reduce is the same for both batches; the larger batch hides it better.
    assert at8[0]["allreduce_ms"] == at8[1]["allreduce_ms"]
    assert at8[0]["efficiency"] < at8[1]["efficiency"]
    note = [p for p in preds if "note" in p][0]
    assert note["per_device_batch"] >= 128
    md = benchmark.markdown_table(rows)
    assert md.splitlines()[0].startswith("| model | devices |")
    failed = dict(rows[0], error="RuntimeError: out of memory")
    assert "ERROR" in benchmark.case_line(failed)


def test_input_throughput_is_reported(capsys):
    args = benchmark.parse_args(
        [
            "--image-size=32",
            "--batch=8",
            "--input",
            "--input-images=64",
            "--input-decode-images=12",
            "--input-workers=0",
        ]
    )
    result = benchmark.measure_input(args)
    assert result["images_per_s"] > 0 and result["batch_size"] == 8
    assert "input pipeline:" in capsys.readouterr().out


def test_clinical_report_time_is_reported_against_its_target():
    result = benchmark.measure_clinical(repeats=2, resamples=50)
    assert result["resamples"] == 50 and result["test_images"] == 160
    assert len(result["seconds"]) == 2 and result["median_s"] > 0
    assert result["met"] == (result["median_s"] < result["target_s"])
    line = benchmark.clinical_line(result)
    assert "50 bootstrap resamples of 160 test images" in line
    assert ("MISSED" in line) != result["met"]
    json.dumps(result)


def test_cold_and_warm_compiles_are_reported():
    def case(cold, warm):
        t = {"cold_compile_s": cold, "warm_compile_s": warm, "cold_cache": "miss"}
        t.update(warm_cache="hit", cold_lower_s=0.5, warm_lower_s=0.4)
        return {"compile_cache": {"train_step": t}}

    (faster,) = benchmark.compile_cache_lines("resnet18", case(2.0, 0.5))
    assert "cold 2.00 s (miss), warm 0.50 s (hit), warm/cold 0.25" in faster
    assert "MISSED" not in faster
    (slower,) = benchmark.compile_cache_lines("resnet18", case(0.5, 0.6))
    assert "MISSED" in slower
    assert benchmark.compile_cache_lines("resnet18", {}) == []


def test_clinical_flag_reports_and_saves_the_time(tmp_path, monkeypatch, capsys):
    # The measurement itself is tested above; fewer resamples keep this one quick.
    measure = benchmark.measure_clinical
    monkeypatch.setattr(
        benchmark.fixed_costs, "measure_clinical", lambda: measure(repeats=1, resamples=20)
    )
    benchmark.main(["--models=", "--clinical", "--ring=", f"--out={tmp_path}"])
    assert "clinical report: 20 bootstrap resamples of 160 test images" in capsys.readouterr().out
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["clinical"]["resamples"] == 20 and saved["rows"] == []


def test_compile_cache_figures_fill_their_columns():
    timed = {"lower_s": 0.1, "compile_s": 0.2}
    r = {
        "strategy": "shard_map",
        "num_devices": 1,
        "per_device_batch": 2,
        "global_batch_size": 2,
        "step_time_s": {"median": 0.01, "p10": 0.01, "p90": 0.01},
        "images_per_s": 200.0,
        "images_per_s_per_device": 200.0,
        "images_per_s_pipelined": 210.0,
        "compute_time_s": {"median": 0.01},
        "exposed_collective_s": 0.0,
        "compile": {"train_step": timed},
        "compile_cache": {"train_step": {"cold_compile_s": 1.234, "warm_compile_s": 0.456}},
        "num_params": 10,
        "gradient_bytes": 40,
        "platform": "cpu",
        "device_kind": "cpu",
        "simulated": False,
    }
    args = benchmark.parse_args(["--image-size=32"])
    row = benchmark.to_row("resnet18", r, args)
    assert (row["compile_cold_s"], row["compile_warm_s"]) == (1.23, 0.46)
    del r["compile_cache"]
    row = benchmark.to_row("resnet18", r, args)
    assert row["compile_cold_s"] is None and row["compile_warm_s"] is None
