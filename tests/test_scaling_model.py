"""The scaling model: each term against a hand computation, the validate command on a
hand-written published table, and the fitting on rows the model itself generated."""

import csv
import math
import pathlib

import pytest

from bcjax.timing import scaling_model as sm
from bcjax.timing.scaling_model import fitting, presets, published, terms
from bcjax.timing.scaling_model.__main__ import main

FIXTURE = pathlib.Path(__file__).parent / "data" / "published_scaling_fixture.csv"
# NVIDIA DeepLearningExamples' published rows as printed (source_path@commit per row).
PUBLISHED = pathlib.Path(__file__).parent / "data" / "published_scaling.csv"
# A fabric that costs exactly bytes / 1 GB/s per ring pass, with no latencies.
UNIT_LINK = presets.Interconnect("unit", 1e9, 0.0, "test", base_latency=0.0)
FREE_LINK = presets.Interconnect("free", 1e30, 0.0, "test", base_latency=0.0)


# ------------------------------------------------------------------ terms


def test_allreduce_alone_per_bucket():
    # pcie4: 24 GB/s busbw, NCCL latencies 8.4 us base + 5.7 us per ring step.
    # 4 GPUs, 100 MB in one bucket: 8.4 + 6 * 5.7 us + 2*3/4 * 1e8 / 24e9 s.
    one = 8.4e-6 + 6 * 5.7e-6 + 1.5 * 1e8 / 24e9
    assert sm.bucket_costs(1e8, 4, "pcie4", None) == [pytest.approx(one)]
    # In 25 MiB buckets: 3 full + the rest; each pays the latency, bytes add up.
    costs = sm.bucket_costs(1e8, 4, "pcie4", 25 * 2**20)
    assert len(costs) == 4
    assert sum(costs) == pytest.approx(4 * (8.4e-6 + 6 * 5.7e-6) + 1.5 * 1e8 / 24e9)
    # No overlap, no sync: the step is compute + the whole all-reduce.
    row = sm.step_time(10e-3, 1e8, 4, "pcie4", bucket_bytes=None, overlap=0.0, sync_cv=0.0)
    assert row["step_s"] == pytest.approx(10e-3 + one)
    assert sm.bucket_costs(1e8, 1, "pcie4") == [0.0]


def test_allreduce_across_nodes_uses_the_network():
    # 16 GPUs on 8-GPU nodes: network bandwidth, and 2 of the 30 ring steps at its latency.
    link = presets.Interconnect(
        "x",
        100e9,
        1e-6,
        "test",
        base_latency=0.0,
        gpus_per_node=8,
        network_bus_bandwidth=10e9,
        network_hop_latency=10e-6,
    )
    expected = 28 * 1e-6 + 2 * 10e-6 + 2 * 15 / 16 * 1e9 / 10e9
    assert sm.bucket_costs(1e9, 16, link, None) == [pytest.approx(expected)]


def test_overlap_with_the_backward_pass():
    # Two buckets of 1 MB on 4 GPUs: 1.5 ms each. Compute 3 ms, backward 2 ms: bucket 1 is
    # ready at 1 ms and ends at 2.5 ms; bucket 2 is ready at 2 ms, waits for the link until
    # 2.5 ms, ends at 4 ms: 2 ms exposed after the backward, step 5 ms.
    row = sm.step_time(3e-3, 2e6, 4, UNIT_LINK, bucket_bytes=1e6, sync_cv=0.0)
    assert row["allreduce_s"] == pytest.approx(3e-3)
    assert row["exposed_collective_s"] == pytest.approx(2e-3)
    assert row["step_s"] == pytest.approx(5e-3)
    # Small buckets finish under the backward: only the last one is exposed.
    assert sm.exposed_allreduce([1.0, 1.0], 4.0) == pytest.approx(1.0)
    # One bucket can only start at the end: fully exposed, as without overlap.
    assert sm.exposed_allreduce([3.0], 4.0) == pytest.approx(3.0)


def test_sync_term_is_the_expected_slowest_of_n():
    # E[max of n standard normals]: 1/sqrt(pi) for 2; 1.0294 for 4 and 1.4236 for 8
    # (tabulated normal order statistics).
    assert sm.expected_max_normal(1) == 0.0
    assert sm.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-6)
    assert sm.expected_max_normal(4) == pytest.approx(1.0294, abs=1e-4)
    assert sm.expected_max_normal(8) == pytest.approx(1.4236, abs=1e-4)
    row = sm.step_time(0.1, 0.0, 2, FREE_LINK, sync_cv=0.02, node_sync_cv=0.05)
    assert row["sync_s"] == pytest.approx(0.02 / math.sqrt(math.pi) * 0.1, rel=1e-6)
    assert row["step_s"] == pytest.approx(0.1 + row["sync_s"])
    # Host contention: 14% of compute with all 8 of the host's GPUs busy, 3/7 of it with 4.
    row = sm.step_time(0.1, 0.0, 8, FREE_LINK, sync_cv=0.0, host_contention=0.14)
    assert row["contention_s"] == pytest.approx(0.014) and row["step_s"] == pytest.approx(0.114)
    assert terms.limit_of(row, 0.1 / 0.114, False) == "host"
    row = sm.step_time(0.1, 0.0, 4, FREE_LINK, sync_cv=0.0, host_contention=0.14)
    assert row["contention_s"] == pytest.approx(0.14 * 3 / 7 * 0.1)
    assert sm.step_time(0.1, 0.0, 1, FREE_LINK, host_contention=0.14)["contention_s"] == 0.0
    # 16 GPUs, 8 per host: two hosts, the slower of the two adds its own jitter.
    row = sm.step_time(0.1, 0.0, 16, FREE_LINK, sync_cv=0.02, node_sync_cv=0.05)
    e16 = sm.expected_max_normal(16)
    assert 1.76 < e16 < 1.77  # tabulated: 1.7660
    assert row["sync_s"] == pytest.approx((0.02 * e16 + 0.05 / math.sqrt(math.pi)) * 0.1)


def test_input_bound_rows():
    # 1,000 img/s on one GPU at batch 100: 8 GPUs would do 8,000, a host delivers 6,000.
    row = sm.weak_scaling(1000.0, 100, 0.0, 8, FREE_LINK, input_ceiling=6000.0, sync_cv=0.0)
    assert row["images_per_s"] == pytest.approx(6000.0)
    assert row["efficiency"] == pytest.approx(0.75)
    assert row["limit"] == "input"
    assert row["step_s"] == pytest.approx(8 * 100 / 6000.0)  # the GPUs wait for input
    # Two 8-GPU nodes bring two hosts.
    row = sm.weak_scaling(1000.0, 100, 0.0, 16, FREE_LINK, input_ceiling=6000.0, sync_cv=0.0)
    assert row["images_per_s"] == pytest.approx(12000.0)
    free = sm.weak_scaling(1000.0, 100, 0.0, 8, FREE_LINK, sync_cv=0.0)
    assert free["efficiency"] == pytest.approx(1.0) and free["limit"] == "compute"


def test_ring_model_api_against_hand_computation():
    # Moved from test_timing.py (ring_model is now part of this module).
    # 4 devices, 100 MB, 25 GB/s, 10 us per hop: 2*3/4 * 1e8 / 25e9 = 6 ms; 6 hops = 0.06 ms.
    assert sm.ring_allreduce_time(1e8, 4, 25e9, 10e-6) == pytest.approx(6.06e-3)
    assert sm.ring_allreduce_time(1e8, 1, 25e9, 10e-6) == 0.0
    grad = 11_689_512 * 4
    assert sm.ring_allreduce_time(grad, 8, 450e9, 3e-6) == pytest.approx(
        1.75 * grad / 450e9 + 14 * 3e-6
    )
    # pcie4 preset, one bucket, half hidden, no sync term.
    allreduce = 8.4e-6 + 6 * 5.7e-6 + 1.5 * 1e8 / 24e9
    kw = dict(bucket_bytes=None, sync_cv=0.0)
    p = sm.predict(10e-3, 1e8, 4, "pcie4", overlap=0.5, per_device_batch=32, **kw)
    assert p["step_s"] == pytest.approx(10e-3 + 0.5 * allreduce)
    assert p["efficiency"] == pytest.approx(10e-3 / p["step_s"])
    assert p["speedup"] == pytest.approx(4 * 10e-3 / p["step_s"])
    assert p["images_per_s"] == pytest.approx(4 * 32 / p["step_s"])
    model = sm.ComputeModel.fit([(8, 3.25e-3), (32, 10e-3)])
    assert model.fixed == pytest.approx(1e-3) and model.per_example == pytest.approx(0.28125e-3)
    rows = sm.strong_scaling_table(model, 1e8, 32, devices=(1, 4), link="pcie4", overlap=0.0, **kw)
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["step_s"] == pytest.approx(3.25e-3 + allreduce)
    assert rows[1]["efficiency"] == pytest.approx(10e-3 / (4 * (3.25e-3 + allreduce)))
    b = sm.batch_for_efficiency(model, 1e8, 8, 0.9, link="pcie4", overlap=0.0, **kw)
    eff = lambda bb: sm.predict(model(bb), 1e8, 8, "pcie4", overlap=0.0, **kw)["efficiency"]  # noqa: E731
    assert eff(b) >= 0.9 > eff(b // 2)
    with pytest.raises(ValueError):
        sm.interconnect("carrier-pigeon")
    assert sm.interconnect("nvlink_h100") is sm.PRESETS["nvlink4-nvswitch"]
    assert "| devices |" in sm.format_markdown(rows)


def test_every_interconnect_preset_names_its_source():
    wanted = {
        "pcie3",
        "pcie4",
        "pcie5",
        "nvlink1-hybrid-cube-mesh",
        "nvlink2-hybrid-cube-mesh",
        "nvlink2-nvswitch",
        "nvlink3-nvswitch",
        "nvlink4-nvswitch",
        "nvlink5-nvswitch",
    }
    assert wanted <= set(sm.PRESETS)
    for name in wanted:
        link = sm.PRESETS[name]
        assert link.bus_bandwidth > 0 and ("NCCL" in link.note or "assumption" in link.note)
    # NCCL's constants reproduce the maintainers' figures: H100 18 x 20.6 ~ 370 GB/s.
    assert 18 * presets.NCCL_NVLINK_GBPS["SM90"] == pytest.approx(370, abs=2)


# ------------------------------------------------------------------ published rows


def _fixture_efficiencies():
    """throughput(N) / (N throughput(1)) straight from the fixture, per (table, gpus)."""
    with open(FIXTURE, newline="") as f:
        rows = list(csv.DictReader(f))
    ips = lambda r: float(r["images_per_s"].replace(",", ""))  # noqa: E731
    one = {r["table_id"]: ips(r) for r in rows if r["gpus"] == "1"}
    return {
        (r["table_id"], int(r["gpus"])): ips(r) / (int(r["gpus"]) * one[r["table_id"]])
        for r in rows
        if r["table_id"] in one
    }


def test_validate_command_on_a_hand_written_table(tmp_path, capsys):
    assert main(["validate", "--published", str(FIXTURE), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "validation.csv", newline="") as f:
        out = list(csv.DictReader(f))
    assert {
        "table_id",
        "gpus",
        "published_efficiency",
        "predicted_efficiency",
        "error",
        "limit",
        "reason",
    } <= set(out[0])
    assert len(out) == 13  # none dropped
    by_key = {(r["table_id"], int(r["gpus"])): r for r in out}
    for key, efficiency in _fixture_efficiencies().items():
        assert float(by_key[key]["published_efficiency"]) == pytest.approx(efficiency, abs=1e-4)
    # Blank params filled from the zoo (torchvision's ResNet-18 at 1000 classes).
    assert by_key[("B", 4)]["params"] == "11689512"
    assert by_key[("B", 4)]["predicted_efficiency"] != ""
    assert "not in bcjax's zoo" in by_key[("C", 8)]["reason"]
    assert by_key[("C", 8)]["predicted_efficiency"] == ""
    assert "unknown interconnect 'nvlink9-warp'" in by_key[("D", 2)]["reason"]
    assert "no 1-GPU row" in by_key[("E", 2)]["reason"]
    assert "above linear" in by_key[("F", 8)]["reason"]
    assert "batch_per_gpu blank" in by_key[("F", 8)]["assumptions"]
    # Series A by hand: ResNet-50's fp32 gradients in PyTorch's 25 MiB buckets on DGX A100
    # (230 GB/s); compute 256 / 1000 s; the last bucket is ready only when the backward ends.
    grad = 25_557_032 * 4
    last = grad - 3 * 25 * 2**20
    latency = 8.4e-6 + 14 * 3.4e-6
    step = 0.256 * (1 + presets.SYNC_CV * sm.expected_max_normal(8)) + (
        latency + 1.75 * last / 230e9
    )
    a = by_key[("A", 8)]
    assert float(a["predicted_efficiency"]) == pytest.approx(0.256 / step, abs=1e-4)
    assert float(a["error"]) == pytest.approx(
        float(a["predicted_efficiency"]) - float(a["published_efficiency"]), abs=2e-4
    )
    # Series G's 1-GPU row is half of A's on the same chip (framework, model, precision and
    # batch alike): its compute is A's, so it predicts A's throughput, efficiency vs its own.
    g = by_key[("G", 8)]
    assert "compute taken from table A" in g["assumptions"] and g["reason"] == ""
    assert float(g["predicted_images_per_s"]) == pytest.approx(8000 * 0.256 / step, rel=1e-4)
    assert float(g["predicted_efficiency"]) == pytest.approx(2 * 0.256 / step, abs=1e-4)
    assert "compute taken" not in a["assumptions"]
    summary = (tmp_path / "summary.md").read_text()
    assert "- table G, 8 GPUs: 1-GPU row (500 img/s) is 2.00x slower than table A's" in summary
    assert "naive MAE" in summary and "not in bcjax's zoo" in summary
    assert (tmp_path / "predicted_vs_published.png").stat().st_size > 10_000
    # A measured bus bandwidth makes the unknown fabric predictable.
    assert (
        main(
            [
                "validate",
                "--published",
                str(FIXTURE),
                "--out",
                str(tmp_path / "m"),
                "--busbw",
                "20e9",
            ]
        )
        == 0
    )
    with open(tmp_path / "m" / "validation.csv", newline="") as f:
        measured = {(r["table_id"], r["gpus"]): r for r in csv.DictReader(f)}
    assert measured[("D", "2")]["predicted_efficiency"] != ""


def test_validate_names_missing_columns(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("table_id,gpus,images_per_s\n1,1,100\n")
    assert main(["validate", "--published", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s)" in err and "interconnect" in err and "data_source" in err


def _rows_from_model(cv, ceiling, node_cv=0.0, contention=0.0):
    """Published-like rows whose figures the model itself produced (cv, one CPU ceiling,
    the hosts' jitter on 16 GPUs = two DGX A100)."""
    rows = []
    for i, (loader, batch) in enumerate(
        [
            ("real, DALI (GPU)", 256),
            ("real, DALI (GPU)", 64),
            ("real, tf.data (CPU)", 256),
            ("real, tf.data (CPU)", 64),
        ]
    ):
        base = {
            "table_id": str(i),
            "framework": "TensorFlow 1 (Horovod)",
            "model": "ResNet-50",
            "gpu": "A100 (DGX A100)",
            "batch_per_gpu": str(batch),
            "precision": "AMP",
            "params": "25557032",
            "interconnect": "nvlink3-nvswitch",
            "data_source": loader,
            "notes": "",
        }
        rows.append({**base, "gpus": "1", "images_per_s": "2500"})
        for n in (2, 4, 8, 16):
            ceil = ceiling if "CPU" in loader else None
            p = sm.weak_scaling(
                2500,
                batch,
                25557032 * 4,
                n,
                "nvlink3-nvswitch",
                sync_cv=cv,
                node_sync_cv=node_cv,
                host_contention=contention if "CPU" in loader else 0.0,
                input_ceiling=ceil,
                bucket_bytes=64 * 2**20,
            )
            rows.append({**base, "gpus": str(n), "images_per_s": str(p["images_per_s"])})
    return rows


def test_fit_recovers_parameters_it_generated():
    cases = published.prepare(_rows_from_model(0.01, 15000.0, node_cv=0.04))
    params = fitting.fit(cases)
    assert params.sync_cv == pytest.approx(0.01)
    assert params.node_sync_cv == pytest.approx(0.04)
    assert dict(params.input_ceilings) == {
        ("tensorflow 1/tf.data", "dgx-a100"): pytest.approx(15000.0, rel=1e-6)
    }
    assert params.host_contention == ()
    loo = fitting.leave_one_out(cases, lambda c: c["table_id"])
    assert all(x["mae"] < 0.05 for x in loo)
    # The CPU loader's host loses 5% of compute to contention, and has no ceiling.
    params = fitting.fit(published.prepare(_rows_from_model(0.01, None, contention=0.05)))
    assert params.sync_cv == pytest.approx(0.01) and params.input_ceilings == ()
    assert dict(params.host_contention) == {
        ("tensorflow 1/tf.data", "dgx-a100"): pytest.approx(0.05, abs=1e-4)
    }


def test_a_ceiling_must_explain_more_than_noise(monkeypatch):
    # No ceiling generated; one CPU row printed 0.2% below the model. A ceiling at that
    # figure would "explain" it and cap any faster run of the pipeline: not kept.
    rows = _rows_from_model(0.01, None)
    row = next(r for r in rows if r["table_id"] == "2" and r["gpus"] == "8")
    row["images_per_s"] = str(float(row["images_per_s"]) * 0.998)
    assert fitting.fit(published.prepare(rows)).input_ceilings == ()
    monkeypatch.setattr(fitting, "MIN_GROUP_GAIN", 0.0)
    assert len(fitting.fit(published.prepare(rows)).input_ceilings) == 1


def test_shipped_parameters_are_the_declared_fit():
    cases = published.prepare(published.read_published(PUBLISHED))
    params = fitting.fit(c for c in cases if fitting.in_fit_subset(c))
    assert params.sync_cv == presets.SYNC_CV
    assert params.node_sync_cv == presets.NODE_SYNC_CV
    assert dict(params.host_contention) == presets.HOST_CONTENTION
    assert dict(params.input_ceilings) == presets.INPUT_CEILINGS


def test_busi_question_against_hand_computation(tmp_path):
    from bcjax.timing.scaling_model import busi

    validation = tmp_path / "validation.csv"
    validation.write_text("gpus,published_efficiency,error\n2,0.95,0.01\n2,0.97,-0.03\n")
    bars = busi.error_bars(validation)
    assert bars[2] == pytest.approx((0.02, 0.03))
    rows = busi.busi_rows(bars)
    assert len(rows) == 2 * 2 * 2 * 4
    # ResNet-18 (3 classes) over PCIe 4, global batch 32 on 2 GPUs, all-reduce not overlapped:
    # compute from BENCH.md's two points; 44.7 MB of gradients in two XLA buckets of
    # (8.4 + 2 x 5.7 us + bytes / 24 GB/s) each; sync = cv / sqrt(pi) x compute(16).
    per_image = (128 / 14_265 - 32 / 9_179) / 96
    compute = lambda b: 32 / 9_179 + per_image * (b - 32)  # noqa: E731
    grad = 11_178_051 * 4
    allreduce = 2 * (8.4e-6 + 2 * 5.7e-6) + grad / 24e9
    step = compute(16) * (1 + presets.SYNC_CV / math.sqrt(math.pi)) + allreduce
    row = next(
        r
        for r in rows
        if (r["model"], r["link"], r["global_batch"], r["devices"]) == ("resnet18", "pcie4", 32, 2)
    )
    assert row["speedup_no_overlap"] == pytest.approx(compute(32) / step)
    assert row["mae"] == pytest.approx(0.02)
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["devices"] == 1)
    assert busi.verdict(0.9, 0.9, 0.02) == "slower"
    assert busi.verdict(1.2, 0.95, 0.02) == "gains if overlapped, slower if not"
    assert busi.verdict(1.01, 1.01, 0.02) == "no clear change"
    text = busi.write_busi_question(tmp_path, validation)
    assert text.count("| resnet18 |") == 16 and (tmp_path / "busi_question.md").exists()


def test_heldout_models_parameter_counts_against_the_zoo():
    # tools/scaling_heldout_models.py counts (SE-)ResNeXt layer by layer; with one group of
    # width 64 the same count is ResNet, which bcjax's zoo has (torchvision's counts).
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "tools" / "scaling_heldout_models.py"
    spec = importlib.util.spec_from_file_location("scaling_heldout_models", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    resnet = dict(groups=1, width_per_group=64)
    assert tool.resnext_params((3, 4, 6, 3), **resnet) == published.zoo_params("resnet50")
    assert tool.resnext_params((3, 4, 23, 3), **resnet) == published.zoo_params("resnet101")
    # timm lists resnext101_32x4d at 44.18 M and seresnext101_32x4d at 48.96 M parameters.
    assert tool.resnext_params() == 44_177_704 and tool.resnext_params(se=True) == 48_955_416
