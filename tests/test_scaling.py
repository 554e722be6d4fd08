"""bcjax.scaling: the study's table and plot over device counts.

The table/plot code runs on fabricated run outputs (fast); the override tests
compare the config the tool reads with the one its training child parses (no
training). The end-to-end study runs through the scaling notebook
(tests/test_notebooks.py).
"""

import csv
import json
import os
import pathlib
import subprocess

import pytest

from bcjax import scaling
from bcjax.timing import scaling_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")


def _fake_run(
    workdir: pathlib.Path,
    n: int,
    *,
    wall: float,
    step: float,
    compute: float,
    wait: float = 0.001,
    gbs: int = 32,
    with_breakdown: bool = True,
) -> None:
    workdir.mkdir(parents=True)
    results = {
        "model": "resnet18",
        "strategy": "shard_map",
        "num_devices": n,
        "num_processes": 1,
        "platform": "cpu",
        "global_batch_size": gbs,
        "num_epochs": 3,
        "steps_per_epoch": 17,
        "dataset": "synthetic",
        "best_epoch": 2,
        "wall_time_s": wall,
        "test": {
            "accuracy": 0.8,
            "macro_f1": 0.7,
            "auc_macro": 0.9,
            "class_names": ["normal", "benign", "malignant"],
        },
        "config": {"model": "resnet18", "width": 4, "width_multiplier": 1.0, "image_size": 32},
    }
    timing = {
        "compile": {"train_step": {"lower_s": 1.0, "compile_s": 4.0}},
        "phases_s": {"data": 1.0, "eval": 0.5},
        "steps_timed": 40,
        "step_time_s": {"median": step + wait, "p10": step, "p90": step * 1.2},
        "input_wait_s": {"median": wait, "mean": wait},
    }
    if with_breakdown:
        timing["breakdown"] = {
            "step_time_s": {"median": step},
            "compute_time_s": {"median": compute},
            "exposed_collective_s": step - compute,
            "allreduce_s": {"median": (step - compute) * 2},
            "gradient_bytes": 4 * 11_689_512,
        }
    (workdir / "results.json").write_text(json.dumps(results))
    (workdir / "timing.json").write_text(json.dumps(timing))
    (workdir / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps({"step": 17 * e, "epoch": e, "epoch_time_s": 0.5 + 0.1 * e})
            for e in (1, 2, 3)
        )
    )


def test_plan_runs():
    runs = scaling.plan_runs([4, 1, 2], "same_global", 32, 0.1)
    assert [
        (r["devices"], r["global_batch"], r["per_device_batch"], r["learning_rate"]) for r in runs
    ] == [(1, 32, 32, 0.1), (2, 32, 16, 0.1), (4, 32, 8, 0.1)]
    runs = scaling.plan_runs([1, 2, 4], "same_per_device", 32, 0.1)
    assert [(r["global_batch"], r["per_device_batch"]) for r in runs] == [
        (32, 32),
        (64, 32),
        (128, 32),
    ]
    assert [r["learning_rate"] for r in runs] == pytest.approx([0.1, 0.2, 0.4])
    assert scaling.plan_runs([1, 2], "same_per_device", 32, 0.1, "none")[1]["learning_rate"] == 0.1
    with pytest.raises(ValueError, match="multiple of 3"):
        scaling.plan_runs([1, 3], "same_global", 32, 0.1)
    with pytest.raises(ValueError):
        scaling.plan_runs([1], "sideways", 32, 0.1)


def test_table_and_plot_from_run_outputs(tmp_path):
    _fake_run(tmp_path / "dev1", 1, wall=100.0, step=0.100, compute=0.100)
    _fake_run(tmp_path / "dev2", 2, wall=60.0, step=0.060, compute=0.050)
    _fake_run(tmp_path / "dev4", 4, wall=50.0, step=0.040, compute=0.025)
    runs = [scaling.read_run(tmp_path / f"dev{n}") for n in (4, 1, 2)]
    rows = scaling.build_table(runs, "same_global", link="pcie4", overlap=0.0)
    assert [r["devices"] for r in rows] == [1, 2, 4]
    r1, r2, r4 = rows
    assert r2["speedup"] == pytest.approx(100 / 60) and r4["efficiency"] == pytest.approx(2 / 4)
    assert r4["speedup_step"] == pytest.approx(0.100 / 0.040)
    assert r2["compute_share"] == pytest.approx(0.050 / 0.061)
    assert r2["collective_share"] == pytest.approx(0.010 / 0.061)
    assert r2["input_share"] == pytest.approx(0.001 / 0.061)
    assert r1["epoch_s"] == pytest.approx(0.7) and r1["compile_s"] == pytest.approx(5.0)
    assert r4["test_macro_f1"] == 0.7 and r4["per_device_batch"] == 8 and r4["simulated"]
    # The scaling model, same global batch, compute proportional to batch from
    # the 1-device run: each of 4 devices computes 25 ms, then all-reduces the
    # 46.8 MB of gradients (none of it hidden at --overlap=0); one device took 100 ms.
    gradient_bytes = 4 * 11_689_512
    expected = scaling_model.predict(
        0.025,
        gradient_bytes,
        4,
        "pcie4",
        overlap=0.0,
        single_device_step_s=0.100,
        global_batch_scaling=True,
    )
    assert r4["pred_step_ms"] == pytest.approx(expected["step_s"] * 1e3)
    assert r4["pred_speedup"] == pytest.approx(0.100 / expected["step_s"])
    # Never less than the compute plus the ring's bandwidth term at PCIe 4's 24 GB/s.
    assert r4["pred_step_ms"] > (0.025 + 2 * 3 / 4 * gradient_bytes / 24e9) * 1e3
    assert r1["pred_efficiency"] == pytest.approx(1.0)

    md = scaling.write_outputs(rows, tmp_path, mode="same_global", link="pcie4", overlap=0.0)
    assert "timings simulated" in md and "SYNTHETIC" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 4
    two = next(line for line in md.splitlines() if line.startswith("| 2 |")).split(" | ")
    # Scores to 3 decimals, shares in percent: test accuracy 0.8, compute 50 of 61 ms.
    assert two[3] == "0.800" and "82.0%" in two
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with open(tmp_path / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["devices"]) for r in table] == [1, 2, 4]
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["simulated"] and len(saved["rows"]) == 3
    assert not any(k.startswith("_") for k in saved["rows"][0])


def test_table_without_breakdown_and_measured_compute(tmp_path):
    for n, wall in ((1, 10.0), (2, 8.0)):
        _fake_run(tmp_path / f"dev{n}", n, wall=wall, step=0.02, compute=0.02, with_breakdown=False)
    runs = [scaling.read_run(tmp_path / f"dev{n}") for n in (1, 2)]
    rows = scaling.build_table(runs, "same_per_device", compute_points={32: 0.02})
    assert rows[1]["compute_share"] is None and rows[1]["collective_share"] is None
    assert rows[1]["input_share"] == pytest.approx(0.001 / 0.021)
    # Gradient size from the model itself when no breakdown recorded it.
    assert rows[0]["gradient_bytes"] > 0
    assert rows[1]["pred_efficiency"] < 1.0 and "measured" in rows[1]["pred_compute_source"]
    scaling.write_outputs(rows, tmp_path, mode="same_per_device", link="nvlink_h100", overlap=0.5)
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_a_one_device_breakdown_of_the_loop_s_own_step_times_is_not_a_synchronised_one(tmp_path):
    # On one device the breakdown times no step (step_time_source "loop"): its step time is
    # the loop's dispatch interval, so the input wait is not netted against it.
    _fake_run(tmp_path / "dev1", 1, wall=10.0, step=0.02, compute=0.02, wait=0.005)
    timing_path = tmp_path / "dev1" / "timing.json"
    timing = json.loads(timing_path.read_text())
    synchronised = scaling.row_from_run(scaling.read_run(tmp_path / "dev1"))
    # The synchronised step (0.02) covers all but 0.005 of the 0.025 interval: 0.005 exposed.
    assert synchronised["input_share"] == pytest.approx(0.005 / 0.025)
    timing["breakdown"]["step_time_source"] = "loop"
    timing["breakdown"]["step_time_s"] = {"median": 0.025}  # the loop's own interval
    timing_path.write_text(json.dumps(timing))
    loop_timed = scaling.row_from_run(scaling.read_run(tmp_path / "dev1"))
    # Interval minus itself would read 0; the wait stands as its upper bound instead.
    assert loop_timed["input_share"] == pytest.approx(0.005 / 0.025)
    assert loop_timed["compute_share"] == synchronised["compute_share"]


def _plant_cv_count(workdir: pathlib.Path, n: int, test_acc, wall, folds_val=None) -> None:
    """dev{n} as a finished bcjax.cv study: per fold results.json and manifest.json."""
    for k, (acc, w) in enumerate(zip(test_acc, wall)):
        wd = workdir / f"dev{n}" / f"fold_{k}"
        wd.mkdir(parents=True)
        report = lambda a: {
            "accuracy": a,
            "balanced_accuracy": a - 0.05,
            "macro_f1": a - 0.1,  # noqa: E731
            "auc_macro": min(a + 0.1, 1.0),
            "loss": 0.5,
            "num_examples": 20,
            "class_names": ["normal", "benign", "malignant"],
        }
        (wd / "results.json").write_text(
            json.dumps(
                {
                    "model": "resnet18",
                    "dataset": "synthetic",
                    "platform": "cpu",
                    "num_devices": n,
                    "best_metric": "macro_f1",
                    "best_epoch": 3,
                    "epochs_trained": 5,
                    "wall_time_s": w,
                    "val_best": report(acc - 0.02),
                    "test": report(acc),
                    "config": {"cv": {"folds": len(test_acc)}},
                }
            )
        )
        val = (folds_val or {}).get(k, [f"benign/benign ({k}).png"])
        (wd / "manifest.json").write_text(
            json.dumps(
                {
                    "train": [],
                    "val": val,
                    "test": ["normal/normal (1).png"],
                    "meta": {"duplicate_groups": []},
                }
            )
        )


def test_cv_mode_table_and_paired_comparison(tmp_path):
    base = [0.70, 0.82, 0.76, 0.88]  # fold-to-fold spread far larger than the effects
    _plant_cv_count(tmp_path, 1, base, [100.0, 101.0, 99.0, 100.0])
    _plant_cv_count(
        tmp_path, 2, [a + d for a, d in zip(base, (0.03, 0.02, 0.035, 0.025))], [60.0] * 4
    )
    _plant_cv_count(
        tmp_path,
        4,
        [a + d for a, d in zip(base, (0.04, -0.05, 0.01, -0.02))],
        [50.0] * 4,
        folds_val={0: ["another/image.png"]},
    )
    rows = scaling.main(
        [
            f"--config={ROOT / 'configs' / 'quickstart.py'}",
            "--devices=1,2,4",
            "--cv-folds=4",
            f"--workdir={tmp_path}",
            "--report-only",
        ]
    )
    assert [r["devices"] for r in rows] == [1, 2, 4] and all(r["folds"] == 4 for r in rows)
    # Mean and interval against a t table: t(0.975, 3) = 3.182446.
    mean = sum(base) / 4
    sd = (sum((x - mean) ** 2 for x in base) / 3) ** 0.5
    assert rows[0]["test_accuracy_mean"] == pytest.approx(mean)
    assert rows[0]["test_accuracy_high"] == pytest.approx(mean + 3.182446 * sd / 2, abs=1e-6)
    assert rows[1]["total_wall_s"] == 240.0 and rows[1]["speedup"] == pytest.approx(400 / 240)
    assert (
        rows[1]["global_batch"] == 32 and rows[1]["per_device_batch"] == 16 and rows[1]["simulated"]
    )

    saved = json.loads((tmp_path / "scaling_cv.json").read_text())
    paired = {(c["devices"], c["metric"]): c for c in saved["paired"]}
    two = paired[(2, "test_accuracy")]
    assert two["differences"] == pytest.approx([0.03, 0.02, 0.035, 0.025])
    assert two["excludes_zero"] and two["verdict"] == "higher on 2 device(s)" and two["same_split"]
    assert paired[(2, "wall_time_s")]["verdict"] == "lower on 2 device(s)"
    four = paired[(4, "test_accuracy")]
    assert not four["excludes_zero"] and four["verdict"] == "within fold-to-fold noise"
    assert four["same_split"] is False  # dev4's fold 0 validated on other images

    md = (tmp_path / "scaling_cv.md").read_text()
    assert "**higher on 2 device(s)**" in md and "pairing is not valid" in md
    assert "timings simulated" in md and "SYNTHETIC" in md
    with open(tmp_path / "scaling_cv.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["devices"]) for r in table] == [1, 2, 4]
    assert float(table[2]["wall_time_s_mean"]) == 50.0
    with open(tmp_path / "scaling_cv_paired.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(scaling.CV_METRICS)
    assert (tmp_path / "scaling_cv.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        tmp_path / "dev2" / "cv_summary.json"
    ).is_file()  # each count's own CV report, recomputed

    with pytest.raises(SystemExit):
        scaling.main(
            [
                f"--config={ROOT / 'configs' / 'quickstart.py'}",
                "--cv-folds=1",
                f"--workdir={tmp_path}",
                "--report-only",
            ]
        )


# ----------------------------------------------------------------- overrides vs the child

# The training child's own flag parsing: bcjax.main defines --config (locked)
# and --workdir; parse its argv with them and print the config it would train.
CHILD_PARSE = (
    "import json, sys\n"
    "from absl import flags\n"
    "import bcjax.main\n"
    "flags.FLAGS(sys.argv)\n"
    "print(json.dumps(flags.FLAGS['config'].value.to_dict()))\n"
)
RUN = {"devices": 2, "global_batch": 32, "per_device_batch": 16, "learning_rate": 0.05}
PLAN_FIELDS = ("num_devices", "global_batch_size", "learning_rate")


def _child_reads(overrides, workdir):
    """The config the child started by the tool parses from the command the tool builds."""
    cmd = scaling.child_command(QUICKSTART, workdir, RUN, overrides)
    assert cmd[1:3] == ["-m", "bcjax.main"]
    proc = subprocess.run(
        [cmd[0], "-c", CHILD_PARSE, *cmd[3:]],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _without_plan_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PLAN_FIELDS}


def test_child_gets_the_user_overrides_unchanged(tmp_path):
    user = ["--config.fresh_start=t", "--config.cv.folds", "3", "--config.num_devices=8"]
    cmd = scaling.child_command(QUICKSTART, tmp_path, RUN, user)
    start = cmd.index(user[0])
    assert cmd[start : start + len(user)] == user
    # The plan's fields come after the user's, so they win over --config.num_devices=8.
    assert cmd[start + len(user) :] == [
        "--config.num_devices=2",
        "--config.global_batch_size=32",
        "--config.learning_rate=0.05",
    ]


def test_fresh_start_t_reads_true_in_the_tool_as_in_the_child(tmp_path):
    """The old hand-written parser read ``t`` as False; config_flags, like the child: True."""
    overrides = ["--config.fresh_start=t"]
    args, tool, passed = scaling.parse_args(
        [f"--config={QUICKSTART}", f"--workdir={tmp_path}", "--devices=1,2", *overrides]
    )
    assert passed == overrides and args.devices == "1,2"
    child = _child_reads(passed, tmp_path)
    assert tool.fresh_start is True and child["fresh_start"] is True
    tool_view = json.loads(json.dumps(tool.to_dict()))
    assert _without_plan_fields(child) == _without_plan_fields(tool_view)
    assert child["num_devices"] == 2 and tool.num_devices == 1


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # absl's bool spellings; an int given to a float field.
        (
            ["--config.augment.enabled=f", "--config.weight_decay=1"],
            {"augment.enabled": False, "weight_decay": 1.0},
        ),
        # A value as the next argument; a nested field.
        (
            ["--config.cv.folds", "3", "--config.synthetic_num=60"],
            {"cv.folds": 3, "synthetic_num": 60},
        ),
    ],
)
def test_other_override_forms_read_as_in_the_child(tmp_path, overrides, expected):
    tool = scaling.read_config(QUICKSTART, overrides)
    child = _child_reads(overrides, tmp_path)
    tool_view = json.loads(json.dumps(tool.to_dict()))
    assert _without_plan_fields(child) == _without_plan_fields(tool_view)
    for path, value in expected.items():
        assert tool[path] == value and type(tool[path]) is type(value), path


@pytest.mark.parametrize(
    "override, reason",
    [
        ("--config.num_epochs=1e3", "invalid literal for int"),  # the old parser read 1000
        # absl's --noFLAG negation is --noconfig.FIELD; this names a field that does not exist.
        ("--config.nofresh_start", "nofresh_start"),
    ],
)
def test_a_value_the_child_refuses_is_refused_by_the_tool(tmp_path, capsys, override, reason):
    with pytest.raises(SystemExit) as exit_info:
        scaling.parse_args([f"--config={QUICKSTART}", f"--workdir={tmp_path}", override])
    assert exit_info.value.code != 0
    assert reason in capsys.readouterr().err
    # The real training entry point, with the command the tool would start:
    # refused while parsing its flags, before any training.
    cmd = scaling.child_command(QUICKSTART, tmp_path / "run", RUN, [override])
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode != 0 and reason in proc.stderr
    assert not (tmp_path / "run").exists()
