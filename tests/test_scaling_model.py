"""The scaling model: each term and each communication scheme against a hand computation,
the validate command on a hand-written published table, the fit reproducing the shipped
fitted.json, and the out-of-sample figures recomputed from the shared tables."""

import csv
import dataclasses
import math
import pathlib
import re
from unittest import mock

import numpy as np
import pytest

from bcjax.timing import scaling_model as sm
from bcjax.timing.scaling_model import fitting, presets, profiles, published, schedule, terms
from bcjax.timing.scaling_model import validate as validate_module
from bcjax.timing.scaling_model.__main__ import main
from bcjax.timing.scaling_model.fitted import SHIPPED

FIXTURE = pathlib.Path(__file__).parent / "data" / "published_scaling_fixture.csv"
# Published rows as printed (source_path@commit per row): NVIDIA DeepLearningExamples and
# TensorFlow's 2017 tf_cnn_benchmarks page, copies of the shared files.
PUBLISHED = pathlib.Path(__file__).parent / "data" / "published_scaling.csv"
TF_CNN = pathlib.Path(__file__).parent / "data" / "tf_cnn_benchmarks_2017.csv"
RESULTS = pathlib.Path(__file__).parents[1] / "results" / "scaling_validation"
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


# ------------------------------------------------------------------ schedules, toy model

# Three layers from input to output: params 1000, 2000, 3000; FLOPs 1, 2, 1. At 4 bytes a
# parameter the gradients are 4,000, 8,000 and 12,000 bytes. With a 4 s backward the
# output layer (c) is ready at 1 s (1 of 4 FLOPs done), b at 3 s, a at 4 s.
TOY = (("a", 1000, 1.0), ("b", 2000, 2.0), ("c", 3000, 1.0))
TOY_GRADS = [(1.0, 12000.0), (3.0, 8000.0), (4.0, 4000.0)]


def toy_cost(nbytes):  # 10 kB per second, no latency
    return nbytes / 1e4


def test_gradients_ready_layer_by_layer_from_the_output():
    got = schedule.ready_times(TOY, 4.0, 4)
    assert [x for pair in got for x in pair] == pytest.approx([x for p in TOY_GRADS for x in p])


def test_per_tensor_schedule_overlapped_and_not():
    # c: 1 -> 2.2; b: 3 -> 3.8; a: 4 -> 4.4: 0.4 s past the backward's end.
    overlapped = dataclasses.replace(presets.SCHEMES["tf1-replicated-nccl"], overlaps=True)
    assert schedule.exposed_time(TOY_GRADS, overlapped, toy_cost, 4.0) == pytest.approx(0.4)
    # TF1 replicated with NCCL (2017): every call after the backward: 1.2 + 0.8 + 0.4 s.
    tf1 = presets.SCHEMES["tf1-replicated-nccl"]
    assert schedule.exposed_time(TOY_GRADS, tf1, toy_cost, 4.0) == pytest.approx(2.4)


def test_bucketed_schedule_ddp_and_xla():
    # 20 kB buckets: c + b fill one (20,000 bytes, ready when b is, 3 s), a goes alone at 4 s.
    # 3 -> 5 s, then a 5 -> 5.4 s: 1.4 s exposed.
    xla_like = dataclasses.replace(presets.SCHEMES["xla"], bucket_bytes=20000)
    assert schedule.messages(TOY_GRADS, xla_like) == [(3.0, 20000.0), (4.0, 4000.0)]
    assert schedule.exposed_time(TOY_GRADS, xla_like, toy_cost, 4.0) == pytest.approx(1.4)
    # DDP: a small first bucket (10 kB) takes c alone at 1 s (1 -> 2.2 s); b and a share
    # the next (12 kB, ready at 4 s): 4 -> 5.2 s, 1.2 s exposed.
    ddp = dataclasses.replace(presets.SCHEMES["ddp"], bucket_bytes=20000, first_bucket_bytes=10000)
    assert schedule.messages(TOY_GRADS, ddp) == [(1.0, 12000.0), (4.0, 12000.0)]
    assert schedule.exposed_time(TOY_GRADS, ddp, toy_cost, 4.0) == pytest.approx(1.2)
    assert presets.SCHEMES["ddp"].bucket_bytes == 25 * 2**20


def test_horovod_fusion_cycles():
    # Cycle 1.5 s, 15 kB buffer: tick 1.5 takes c, tick 3.0 b, tick 4.5 a.
    # 1.5 -> 2.7, 3.0 -> 3.8, 4.5 -> 4.9: 0.9 s exposed.
    hvd = dataclasses.replace(presets.SCHEMES["horovod"], bucket_bytes=15000, cycle_s=1.5)
    assert schedule.messages(TOY_GRADS, hvd) == [(1.5, 12000.0), (3.0, 8000.0), (4.5, 4000.0)]
    assert schedule.exposed_time(TOY_GRADS, hvd, toy_cost, 4.0) == pytest.approx(0.9)
    # A threshold under one tensor splits a cycle's ready tensors into several buffers.
    late = [(0.5, 5000.0), (0.6, 5000.0), (0.7, 5000.0)]
    small = dataclasses.replace(hvd, bucket_bytes=9000)
    assert schedule.messages(late, small) == [(1.5, 5000.0), (1.5, 5000.0), (1.5, 5000.0)]


def test_parameter_server_push_and_pull():
    # Push: per tensor as ready, overlapped: 0.4 s past the backward (as above).
    assert schedule.finish_after(TOY_GRADS, toy_cost, 4.0) == pytest.approx(0.4)
    # Pull over a 2 s forward, input layer first: a arrives at 0.4 (needed at 0), b at 1.2
    # (needed at 0.5), c at 2.4 (needed at 1.5): the forward stalls 0.9 s.
    assert schedule.pull_stall(TOY, 2.0, toy_cost, 4) == pytest.approx(0.9)


def test_parameter_server_schedule_as_tf1_runs_it(monkeypatch):
    # tf_cnn_benchmarks' parameter server: the pushes wait for the whole backward (TF 1.x's
    # GPU-to-CPU copy waits for the compute stream), then go one after another; the pulls
    # overlap the forward. A 6 s step: 4 s backward, 2 s forward. From 2 GPUs on a GPU gets
    # the link's per-GPU share, 10 kB/s here (toy_cost): pushes 1.2 + 0.8 + 0.4 = 2.4 s past
    # the backward, plus the 0.9 s pull stall above.
    monkeypatch.setattr(presets, "PS_BYTES_PER_S_PER_GPU", 1e4)
    case = {
        "scheme": presets.SCHEMES["parameter-server"],
        "link": presets.PRESETS["pcie3"],
        "profile": TOY,
    }
    assert published._exposed(case, 2, 6.0) == pytest.approx(2.4 + 0.9)
    # One GPU has the link to itself (20 kB/s): pushes 1.2 s; pulls a at 0.2 s (needed at
    # 0), b at 0.6 (0.5), c at 1.2 (1.5): a 0.2 s stall.
    assert published._exposed(case, 1, 6.0) == pytest.approx(1.2 + 0.2)
    # Sessions 6-9 overlapped the pushes with the backward: 0.4 s + 0.9 s.
    monkeypatch.setattr(presets, "PS_PUSH_OVERLAPS", True)
    assert published._exposed(case, 2, 6.0) == pytest.approx(0.4 + 0.9)


def test_parameter_server_on_gpus_without_p2p_goes_through_the_host():
    # tf_cnn_benchmarks' default keeps the variables on the GPUs; GeForce cards cannot copy
    # to each other over the bus, so every copy is staged through host memory, shared by all
    # GPUs: each tensor's N - 1 pushes (and pulls) take (N - 1) x bytes / the link's figure,
    # here 10 kB/s. Toy model, 6 s step (4 s backward, 2 s forward), gradients c 12 kB,
    # b 8 kB, a 4 kB. 2 GPUs: pushes 1.2 + 0.8 + 0.4 = 2.4 s after the backward; pulls a at
    # 0.4 s (needed at 0), b at 1.2 (0.5), c at 2.4 (1.5): a 0.9 s stall.
    slow = dataclasses.replace(presets.PRESETS["pcie4-nop2p"], bus_bandwidth=1e4)
    case = {
        "scheme": presets.SCHEMES["parameter-server"],
        "link": slow,
        "profile": TOY,
        "ps_device": "gpu",
    }
    assert published._exposed(case, 2, 6.0) == pytest.approx(2.4 + 0.9)
    # 4 GPUs: three times the bytes through the host: pushes 7.2 s; pulls a 1.2 (0), b 3.6
    # (0.5), c 7.2 (1.5): a 5.7 s stall. One GPU holds every variable: nothing moves.
    assert published._exposed(case, 4, 6.0) == pytest.approx(7.2 + 5.7)
    assert published._exposed(case, 1, 6.0) == 0.0
    # The same parameter server on the CPU keeps the per-GPU link exchange.
    on_cpu = {**case, "ps_device": "cpu"}
    assert published._exposed(on_cpu, 4, 6.0) == pytest.approx(published._exposed(on_cpu, 2, 6.0))
    # Where the variables are, from the notes or tf_cnn_benchmarks' own default.
    tf_cnn = "TensorFlow 1.x (tf_cnn_benchmarks)"
    assert presets.ps_device(tf_cnn, "parameter_server (local_parameter_device cpu)")[0] == "cpu"
    notes = (
        "variable_update: InceptionV3 parameter_server(cpu); AlexNet/VGG16 parameter_server(gpu)"
    )
    assert presets.ps_device(tf_cnn, notes, "VGG16")[0] == "gpu"
    assert presets.ps_device(tf_cnn, notes, "InceptionV3")[0] == "cpu"
    assert presets.ps_device(tf_cnn, "")[0] == "gpu"
    # A GeForce row of tf_cnn_benchmarks' defaults is staged (its 1-GPU step is all compute);
    # a Tesla row with its variables on the GPUs keeps the per-GPU exchange (P2P).
    base = {
        "table_id": "g",
        "framework": tf_cnn,
        "model": "ResNet-50",
        "batch_per_gpu": "64",
        "precision": "FP16",
        "data_source": "synthetic",
    }
    geforce = [
        {**base, "gpu": "GeForce RTX 3090", "gpus": str(n), "images_per_s": str(1000 * n)}
        for n in (1, 4)
    ]
    tesla = [
        {**base, "table_id": "t", "gpu": "Tesla V100 PCIe", "gpus": str(n), "images_per_s": "1"}
        for n in (1, 4)
    ]
    _, g4, _, t4 = published.prepare(geforce + tesla)
    assert g4["ps_device"] == t4["ps_device"] == "gpu"
    assert published._host_staged(g4) and not published._host_staged(t4)
    assert g4["compute_s"] == g4["step_1_s"] and t4["compute_s"] < t4["step_1_s"]


def test_nvlink_on_a_pcie_card_is_a_bridge_not_a_switch():
    # NVLink bridges join two PCIe cards; an "NVLink" text on a GeForce card is not an
    # NVSwitch fabric: the card's PCIe preset (no P2P for GeForce). SXM modules keep NVLink.
    base = {"table_id": "r", "framework": "PyTorch", "model": "ResNet-50", "batch_per_gpu": "64"}
    rows = [
        {**base, "gpu": "GeForce RTX 3090", "interconnect": "NVLink bridge", "gpus": str(n)}
        for n in (1, 8)
    ] + [
        {**base, "table_id": "s", "gpu": "A100-SXM4-80GB", "interconnect": "NVLink", "gpus": str(n)}
        for n in (1, 8)
    ]
    rows = [{**r, "images_per_s": str(100 * int(r["gpus"]))} for r in rows]
    _, bridged, _, sxm = published.prepare(rows)
    assert bridged["link"].name == "pcie4-nop2p"
    assert sxm["link"].name == "nvlink3-nvswitch"
    assert not presets.nvlink_bridge("nvlink3-nvswitch", "GeForce RTX 3090")


def test_tokens_per_second_with_a_batch_of_sequences_is_not_a_step(tmp_path):
    # Efficiency is a ratio within a series in any unit, but batch / throughput is a step
    # time only in one unit: tokens/s with a batch of sequences gets a reason, unless a
    # sequence length converts the batch; a batch stated in tokens is used as it is.
    path = tmp_path / "tokens.csv"
    head = "table_id,framework,model,gpu,gpus,batch_per_gpu,precision,tokens_per_s,params,notes"
    path.write_text(
        head + ",seq_len\n"
        "s,PyTorch,BERT-large,A100-SXM4-80GB,1,32,AMP,80000,,,\n"
        "s,PyTorch,BERT-large,A100-SXM4-80GB,8,32,AMP,600000,,,\n"
        "l,PyTorch,BERT-large,A100-SXM4-80GB,1,32,AMP,80000,,,512\n"
        "l,PyTorch,BERT-large,A100-SXM4-80GB,8,32,AMP,600000,,,512\n"
        "k,PyTorch,BERT-large,A100-SXM4-80GB,1,16384,AMP,80000,,batch_per_gpu in tokens,\n"
        "k,PyTorch,BERT-large,A100-SXM4-80GB,8,16384,AMP,600000,,batch_per_gpu in tokens,\n"
    )
    out = _validated(path, tmp_path / "o")
    assert out[("s", "8")]["reason"].startswith("throughput in tokens/s while batch_per_gpu")
    assert out[("s", "8")]["published_efficiency"]  # the ratio is still reported
    for series in ("l", "k"):
        row = out[(series, "8")]
        assert not row["reason"] and float(row["predicted_efficiency"]) <= 1.0
    # 32 sequences of 512 tokens is the same step as a batch of 16384 tokens
    assert out[("l", "8")]["compute_ms"] == out[("k", "8")]["compute_ms"]
    assert float(out[("l", "8")]["compute_ms"]) == pytest.approx(16384 / 80000 * 1e3, rel=1e-3)


def test_external_tables_parse_and_get_a_prediction_or_a_reason(tmp_path):
    # The third-party tables transcribed for the blind check (results/scaling_validation/
    # external) have exactly the shared columns, and every row gets a prediction at most
    # linear inside its interval, or a stated reason (no figure of theirs is asserted).
    external = RESULTS / "external" / "external_scaling.csv"
    with open(external, newline="") as f, open(PUBLISHED, newline="") as g:
        assert next(csv.reader(f)) == next(csv.reader(g))
    out = _validated(external, tmp_path / "o")
    assert len(out) == sum(1 for _ in open(external)) - 1
    predicted = 0
    for r in out.values():
        assert int(r["table_id"]) >= 900
        if r["predicted_efficiency"]:
            predicted += 1
            prediction = float(r["predicted_efficiency"])
            assert prediction <= 1.0
            assert float(r["interval_low"]) <= prediction <= float(r["interval_high"])
        else:
            assert r["limit"].startswith("not predicted: ") and r["reason"]
    assert predicted > 0


def test_parameter_server_across_hosts_pays_the_network():
    # 2 hosts: each NIC carries 2 (H - 1) / H = 1 times the gradient bytes per direction at
    # 10 Gb/s; 4 hosts 1.5 times; one host nothing.
    assert presets.ps_network_seconds(1.25e9, 2) == pytest.approx(1.0)
    assert presets.ps_network_seconds(1.25e9, 4) == pytest.approx(1.5)
    assert presets.ps_network_seconds(1.25e9, 1) == 0.0
    # A distributed_replicated series on 8-GPU hosts: 16 GPUs cost what 8 do on their PCIe
    # links plus the exchange between the 2 hosts, after the backward pass.
    base = {
        "table_id": "1",
        "framework": "TensorFlow 1.x (tf_cnn_benchmarks)",
        "model": "ResNet-50",
        "gpu": "Tesla K80",
        "batch_per_gpu": "32",
        "precision": "FP32",
        "params": "25557032",
        "interconnect": "pcie3",
        "data_source": "synthetic",
        "notes": "distributed_replicated with parameter servers co-located on workers",
    }
    rows = [{**base, "gpus": str(n), "images_per_s": str(50 * n)} for n in (1, 8, 16)]
    one, eight, sixteen = published.prepare(rows)
    assert eight["scheme"].kind == sixteen["scheme"].kind == "parameter_server"
    network = presets.ps_network_seconds(25557032 * 4, 2)
    assert sixteen["exposed_s"] - eight["exposed_s"] == pytest.approx(network, rel=1e-9)


def test_nccl1_ring_in_device_order_leaves_nvlink_past_four_gpus():
    # NCCL 1.x chains GPUs 0..n-1: on DGX-1's hybrid cube-mesh up to 4 GPUs (one fully
    # linked quad) stay on NVLink at 18 GB/s; 8 GPUs cross between the quads over PCIe at
    # NCCL 1.x's 8 GB/s. A PCIe box runs at 8 GB/s whatever the count.
    mesh = presets.PRESETS["nvlink1-hybrid-cube-mesh"]
    assert [presets.nccl1_link(mesh, n).bus_bandwidth for n in (2, 4, 5, 8)] == [
        18e9,
        18e9,
        8e9,
        8e9,
    ]
    assert presets.nccl1_link(presets.PRESETS["pcie3"], 2).bus_bandwidth == 8e9
    base = {
        "table_id": "1",
        "framework": "TensorFlow 1.x (tf_cnn_benchmarks)",
        "model": "VGG16",
        "gpu": "Tesla P100 (NVIDIA DGX-1)",
        "batch_per_gpu": "64",
        "precision": "FP32",
        "interconnect": "nvlink1-hybrid-cube-mesh",
        "data_source": "synthetic",
        "notes": "variable_update: VGG16 replicated (with NCCL)",
    }
    rows = [{**base, "gpus": str(n), "images_per_s": str(150 * n)} for n in (1, 4, 8)]
    _, four, eight = published.prepare(rows)
    assert four["scheme"].kind == eight["scheme"].kind == "per_tensor"
    assert (four["link"].bus_bandwidth, eight["link"].bus_bandwidth) == (18e9, 8e9)
    # per-tensor calls after the backward: VGG16's 138M fp32 gradients at 2 (n-1)/n / busbw
    ring = 2 * 7 / 8 * 138_357_544 * 4 / 8e9
    assert ring < eight["exposed_s"] < ring + 1e-3  # plus one latency per tensor


def test_host_contention_scales_with_the_hosts_cores_a_gpu():
    # The fitted contention is a DGX-1's (40 cores, 8 GPUs: 5 a GPU). For images decoded on
    # the host's CPUs by tf.data (which spreads over the host's cores) a DGX A100 (128 cores)
    # loses 5/16 of it, a host_cores column of 64 on an unknown 8-GPU host 5/8, a host nobody
    # documents all of it; PyTorch's DataLoader and DeepLearningExamples' TF1 Horovod scripts
    # (a fixed number of workers or threads a GPU) lose the same on every host, while TF1's
    # tf_cnn_benchmarks (one process for all GPUs) scales; synthetic input loses nothing.
    def eight_gpu_case(gpu, data, framework="TensorFlow 2", **extra):
        base = {
            "table_id": "1",
            "framework": framework,
            "model": "ResNet-50",
            "gpu": gpu,
            "batch_per_gpu": "256",
            "precision": "AMP",
            "params": "25557032",
            "interconnect": "nvlink3-nvswitch",
            "data_source": data,
            **extra,
        }
        rows = [{**base, "gpus": "1", "images_per_s": "1000"}]
        rows.append({**base, "gpus": "8", "images_per_s": "7000"})
        return published.prepare(rows)[1]

    assert presets.host_cores_per_gpu("V100-SXM2-16GB (DGX-1)")[0] == 5
    assert presets.host_cores_per_gpu("V100 (DGX Station)")[0] == 5  # 20 cores, 4 GPUs
    assert presets.host_cores_per_gpu("V100-SXM3-32GB (DGX-2)")[0] == 3
    assert presets.host_cores_per_gpu("GeForce RTX 3090") == (None, "")
    tf_data = "real, tf.data (CPU)"
    dgx1 = eight_gpu_case("V100-SXM2-16GB (DGX-1)", tf_data)
    a100 = eight_gpu_case("A100-SXM4-80GB (DGX A100)", tf_data)
    synthetic = eight_gpu_case("A100-SXM4-80GB (DGX A100)", "synthetic")
    unknown = eight_gpu_case("A100-SXM4-80GB", tf_data)
    column = eight_gpu_case("A100-SXM4-80GB", tf_data, host_cores="64")
    torch_a100 = eight_gpu_case("A100-SXM4-80GB (DGX A100)", "real, PyTorch loader", "PyTorch")
    tf1_a100 = eight_gpu_case("A100-SXM4-80GB (DGX A100)", tf_data, "TensorFlow 1 (Horovod)")
    tf_cnn = eight_gpu_case(
        "A100-SXM4-80GB (DGX A100)", tf_data, "TensorFlow 1.x (tf_cnn_benchmarks)"
    )
    assert dgx1["cores_per_gpu"] == 5 and a100["cores_per_gpu"] == 16
    assert tf1_a100["family"] == tf_cnn["family"] == "tensorflow1"
    assert (tf1_a100["scheme"].name, tf_cnn["scheme"].name) == ("horovod", "parameter-server")
    cases = (dgx1, a100, synthetic, unknown, column, torch_a100, tf1_a100, tf_cnn)
    shares = [1.0, 5 / 16, 0.0, 1.0, 5 / 8, 1.0, 1.0, 5 / 16]
    assert [c["share"] for c in cases] == pytest.approx(shares)
    params = dataclasses.replace(
        SHIPPED,
        contention=((("pytorch", "cpu", "reduced"), 0.2),),
        pooled_contention=((("cpu", "reduced"), 0.1), (("synthetic", "reduced"), 0.3)),
    )
    losses = [
        published.predict_case(c, params)["contention_s"] / c["compute_s"]
        for c in (dgx1, a100, synthetic, torch_a100)
    ]
    assert losses == pytest.approx([0.1, 0.1 * 5 / 16, 0.0, 0.2])


def test_a_contention_fitted_on_one_model_family_stays_with_that_family(shared_cases):
    # TensorFlow 2's rows are all EfficientNets: its value cannot tell the framework's loss
    # from the EfficientNet pipeline's, so it is keyed by the model family and a TF2 ResNet
    # takes the pooled value; PyTorch's rows span four model families and keep one value.
    names = {
        "EfficientNet-B4 (v1)": "efficientnet",
        "EfficientNet-v2-S": "efficientnet",
        "ResNet-50 v1.5": "resnet",
        "ResNeXt101-32x4d": "resnext",
        "InceptionV3": "inception",
        "VGG16": "vgg",
        "BERT-large": "bert",
        "": "",
    }
    assert {name: presets.model_family(name) for name in names} == names
    tf2 = [c for c in fitting.fittable(shared_cases) if c["family"] == "tensorflow2"]
    assert len(tf2) == 30 and {c["model_family"] for c in tf2} == {"efficientnet"}
    own = dict(SHIPPED.contention)
    assert ("tensorflow2", "cpu", "reduced") not in own
    efficientnet = own[("tensorflow2", "cpu", "reduced", "efficientnet")]
    pooled = dict(SHIPPED.pooled_contention)[("cpu", "reduced")]
    assert efficientnet > pooled > 0 and ("pytorch", "cpu", "reduced") in own

    def tf2_case(model):
        base = {
            "table_id": model,
            "framework": "TensorFlow 2",
            "model": model,
            "gpu": "V100-SXM2-16GB (DGX-1)",
            "batch_per_gpu": "256",
            "precision": "AMP",
            "params": "25557032",
            "interconnect": "nvlink2-hybrid-cube-mesh",
            "data_source": "real, tf.data (CPU)",
        }
        rows = [{**base, "gpus": "1", "images_per_s": "1000"}]
        return published.prepare(rows + [{**base, "gpus": "8", "images_per_s": "7000"}])[1]

    for model, value, source in (
        ("EfficientNet-B0", efficientnet, "tensorflow2/cpu/reduced/efficientnet"),
        ("ResNet-50", pooled, "pooled cpu/reduced"),
    ):
        case = tf2_case(model)
        p = published.predict_case(case, SHIPPED)
        assert p["contention_from"] == source
        assert p["contention_s"] == pytest.approx(value * case["share"] * case["compute_s"])
    # the rule moves the key, not the fit: round 1 (a value from one model family for all
    # of the family's models) fits the same number
    with mock.patch.object(fitting, "MIN_MODEL_FAMILIES", 1):
        round1 = dict(fitting.fit(shared_cases).contention)
    assert round1[("tensorflow2", "cpu", "reduced")] == efficientnet


def test_documented_profiles_match_the_zoo_and_the_tables():
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        assert profiles.total_params(profiles.documented(name)) == published.zoo_params(name)
    assert profiles.total_params(profiles.vgg16()) == 138_357_544  # as the tables print
    assert profiles.total_params(profiles.alexnet()) == 61_100_840
    # timm lists resnext101_32x4d at 44.18 M and seresnext101_32x4d at 48.96 M parameters.
    assert profiles.total_params(profiles.documented("ResNeXt101-32x4d")) == 44_177_704
    assert profiles.total_params(profiles.documented("SE-ResNeXt101-32x4d")) == 48_955_416
    # VGG16's fully connected layers (89% of its parameters) are ready first.
    grads = schedule.ready_times(profiles.vgg16(), 1.0, 4)
    assert sum(b for t, b in grads if t < 0.02) > 0.85 * 4 * 138_357_544


def test_row_properties_from_free_text():
    notes = (
        "variable_update: InceptionV3/ResNet50/ResNet152 parameter_server (local_parameter_"
        "device cpu), AlexNet/VGG16 replicated (with NCCL); CUDA 8.0"
    )
    tf1 = "TensorFlow 1.x (tf_cnn_benchmarks)"
    assert presets.scheme_for(tf1, notes, "VGG16")[0].name == "tf1-replicated-nccl"
    assert presets.scheme_for(tf1, notes, "ResNet-152")[0].name == "parameter-server"
    aws = "variable_update: ResNet-50/ResNet-152 replicated (without NCCL, gpu); x"
    assert presets.scheme_for(tf1, aws, "ResNet-50")[0].name == "parameter-server"
    assert presets.scheme_for("PyTorch", "", "BERT")[0].name == "ddp"
    assert presets.scheme_for("JAX/Flax", "", "")[0].name == "xla"
    assert presets.scheme_for("TensorFlow 1 (Horovod)")[0].name == "horovod"
    assert presets.scheme_for("Caffe2")[0].name == "unknown"
    assert presets.gpu_generation("Tesla K80 (AWS p2.8xlarge)") == "kepler"
    assert presets.gpu_generation("GeForce RTX 3090") == "ampere"
    assert presets.gpu_generation("NVIDIA H100 80GB HBM3") == "hopper"
    assert presets.precision_class("AMP (mixed precision)") == "reduced"
    assert presets.precision_class("TF32") == "full"
    assert presets.input_kind("real, DALI (GPU)") == "gpu"
    assert presets.input_kind("real, DALI-CPU") == "cpu"
    link, _ = presets.infer_interconnect("PCIe Gen4 x16, no P2P", "ampere")
    assert link.name == "pcie4-nop2p"
    assert presets.infer_interconnect("carrier pigeon", "ampere") == (None, "")


# ------------------------------------------------------------------ published rows


def _validated(csv_path, out_dir):
    """`validate` run on csv_path; validation.csv's rows by (table_id, gpus)."""
    assert main(["validate", "--published", str(csv_path), "--out", str(out_dir)]) == 0
    with open(pathlib.Path(out_dir) / "validation.csv", newline="") as f:
        return {(r["table_id"], r["gpus"]): r for r in csv.DictReader(f)}


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
        "interval_low",
        "interval_high",
    } <= set(out[0])
    assert len(out) == 13  # none dropped
    by_key = {(r["table_id"], int(r["gpus"])): r for r in out}
    for key, efficiency in _fixture_efficiencies().items():
        assert float(by_key[key]["published_efficiency"]) == pytest.approx(efficiency, abs=1e-4)
    # Blank params filled from the documented shapes (= torchvision's ResNet-18).
    assert by_key[("B", 4)]["params"] == "11689512"
    # ResNeXt101-32x4d is a documented shape now; an unknown model with blank params is not.
    assert by_key[("C", 8)]["predicted_efficiency"] != ""
    # An unknown interconnect falls back to PCIe 3 and says so.
    assert "unknown interconnect 'nvlink9-warp'" in by_key[("D", 2)]["assumptions"]
    assert "no 1-GPU row" in by_key[("E", 2)]["limit"]
    assert "above linear" in by_key[("F", 8)]["reason"]
    assert "batch_per_gpu blank" in by_key[("F", 8)]["assumptions"]
    for r in out:
        if r["predicted_efficiency"]:
            low, high = float(r["interval_low"]), float(r["interval_high"])
            assert float(r["predicted_efficiency"]) <= 1.0
            assert low <= float(r["predicted_efficiency"]) <= high
        else:
            assert r["limit"].startswith("not predicted: ")
    # Series A by hand: ResNet-50 in PyTorch DDP on DGX A100 (230 GB/s), synthetic data:
    # compute 256 / 1000 s; the exposed all-reduce is DDP's last bucket past the backward.
    a = by_key[("A", 8)]
    compute = 0.256
    contention, _ = SHIPPED.host_contention("pytorch", "synthetic", "reduced")
    sync = SHIPPED.sync_cv * sm.expected_max_normal(8) * compute
    step = compute + float(a["exposed_comm_ms"]) / 1e3 + sync + contention * compute
    assert float(a["predicted_efficiency"]) == pytest.approx(compute / step, abs=1e-4)
    assert (tmp_path / "predicted_vs_published.png").stat().st_size > 10_000
    assert "## Out of sample" in (tmp_path / "summary.md").read_text()


def test_the_peer_rule_is_gone():
    # Series G's 1-GPU row is half of series A's on the same chip, framework, model,
    # precision and batch. It keeps its own figure: the same prediction as A, relative to
    # its own 1-GPU row (no compute taken from A, no efficiency above 1).
    cases = published.prepare(published.read_published(FIXTURE))
    by_key = {(c["table_id"], c.get("gpus")): c for c in cases}
    a, g = by_key[("A", 8)], by_key[("G", 8)]
    assert g["images_per_s_1"] == 500 and a["images_per_s_1"] == 1000
    assert g["compute_s"] == pytest.approx(256 / 500)
    pa, pg = published.predict_case(a), published.predict_case(g)
    assert pg["images_per_s"] == pytest.approx(8 * 500 * pg["efficiency"])
    assert pg["efficiency"] <= 1.0 and pg["images_per_s"] < 0.6 * pa["images_per_s"]
    assert not any("compute taken" in x for x in g["assumptions"])


def test_validate_is_robust_to_unknown_rows(tmp_path):
    # Sequences/s of a model outside the zoo with only params, an unknown framework, GPU and
    # interconnect, one with a per-layer description, and a series without any params.
    path = tmp_path / "odd.csv"
    path.write_text(
        "table_id,framework,model,gpu,gpus,batch_per_gpu,precision,images_per_s,params,"
        "interconnect,data_source,layer_params\n"
        "s,MegaFramework,BERT-large,Weird GPU,1,32,FP16,100,340000000,,real text,\n"
        "s,MegaFramework,BERT-large,Weird GPU,2,32,FP16,180,340000000,,real text,\n"
        "t,PyTorch,toy,RTX 3090,1,64,FP32,1000,,PCIe 4 no P2P,synthetic,1000;2000:4;3000\n"
        "t,PyTorch,toy,RTX 3090,2,64,FP32,1900,,PCIe 4 no P2P,synthetic,1000;2000:4;3000\n"
        "u,PyTorch,mystery,RTX 3090,1,64,FP32,1000,,pcie4,synthetic,\n"
        "u,PyTorch,mystery,RTX 3090,4,64,FP32,3500,,pcie4,synthetic,\n"
    )
    out = _validated(path, tmp_path / "o")
    assert 0 < float(out[("s", "2")]["predicted_efficiency"]) <= 1.0
    assert "unknown interconnect" in out[("s", "2")]["assumptions"]
    assert out[("t", "2")]["params"] == "6000" and "layer_params" in out[("t", "2")]["assumptions"]
    assert "pcie4-nop2p" in out[("t", "2")]["assumptions"]
    assert out[("u", "4")]["limit"].startswith("not predicted: params blank")


def test_interconnect_and_params_from_the_model_and_gpu_names():
    def fabric(gpu):
        link, _ = presets.interconnect_from_gpu(gpu, presets.gpu_generation(gpu))
        return link.name if link else None

    # A DGX/HGX system or an SXM module names its NVLink fabric; a PCIe card its era's PCIe.
    assert fabric("V100-SXM2-16GB (DGX-1)") == "nvlink2-hybrid-cube-mesh"
    assert fabric("Tesla P100-SXM2") == "nvlink1-hybrid-cube-mesh"
    assert fabric("V100-SXM3-32GB (DGX-2H)") == "nvlink2-nvswitch"
    assert fabric("A100-SXM4-40GB") == "nvlink3-nvswitch"
    assert fabric("H100 SXM5 80GB") == "nvlink4-nvswitch"
    assert fabric("H100 PCIe") == "pcie5"
    assert fabric("A100 80GB PCIe") == "pcie4"
    assert fabric("Tesla T4") == "pcie3"
    assert fabric("TPU v3") is None  # no GPU generation: the caller falls back to PCIe 3
    rtx = presets.PRESETS[fabric("GeForce RTX 5090")]
    assert presets.without_p2p(rtx, "GeForce RTX 5090")[0].name == "pcie5-nop2p"
    # Published counts for models outside the zoo, the longest documented name first.
    assert profiles.known_params("BERT-Large Uncased")[0] == 340_000_000
    assert profiles.known_params("GPT-2 medium")[0] == 345_000_000
    assert profiles.known_params("gpt2")[0] == 117_000_000
    assert profiles.known_params("EfficientNet-B4 (v1)")[0] == 19_000_000
    assert profiles.known_params("efficientnet-widese-b4") is None


def test_validate_on_unseen_kinds_of_rows(tmp_path):
    # Invented figures: a consumer card over PCIe 4, BERT in sequences/s with params blank,
    # MXNet with params and interconnect blank, JAX on TPU, a model with no params and a
    # series without a 1-GPU row. Every row gets a prediction or a stated reason, a
    # prediction is at most linear and sits inside its interval.
    path = tmp_path / "unseen.csv"
    path.write_text(
        "table_id,framework,model,gpu,gpus,batch_per_gpu,precision,images_per_s,params,"
        "interconnect,data_source\n"
        "r,PyTorch,ResNet-50,GeForce RTX 3090,1,128,AMP,1000,,PCIe 4.0,real\n"
        "r,PyTorch,ResNet-50,GeForce RTX 3090,4,128,AMP,3400,,PCIe 4.0,real\n"
        "b,PyTorch,BERT-large,A100-SXM4-40GB,1,32,AMP,400,,,Wikipedia sequences\n"
        "b,PyTorch,BERT-large,A100-SXM4-40GB,8,32,AMP,3000,,,Wikipedia sequences\n"
        "m,MXNet,ResNet-50 v1.5,V100-SXM2-16GB,1,256,AMP,1400,,,\n"
        "m,MXNet,ResNet-50 v1.5,V100-SXM2-16GB,8,256,AMP,10500,,,\n"
        "j,JAX,ResNet-50,TPU v3,1,256,BF16,2000,,ICI,synthetic\n"
        "j,JAX,ResNet-50,TPU v3,8,256,BF16,15000,,ICI,synthetic\n"
        "n,PyTorch,MyNet,V100,1,64,FP32,500,,NVLink,real\n"
        "n,PyTorch,MyNet,V100,4,64,FP32,1800,,NVLink,real\n"
        "x,TensorFlow 2,ResNet-50,A100,8,256,AMP,20000,,NVLink,DALI\n"
        "x,TensorFlow 2,ResNet-50,A100,16,256,AMP,38000,,NVLink,DALI\n"
    )
    out = _validated(path, tmp_path / "o")
    assert len(out) == 12
    for r in out.values():
        if r["predicted_efficiency"]:
            prediction = float(r["predicted_efficiency"])
            assert prediction <= 1.0
            assert float(r["interval_low"]) <= prediction <= float(r["interval_high"])
        else:
            assert r["limit"].startswith("not predicted: ") and r["reason"]
    assert "pcie4-nop2p" in out[("r", "4")]["assumptions"]
    assert out[("b", "8")]["params"] == "340000000"
    assert "nvlink3-nvswitch from the gpu column" in out[("b", "8")]["assumptions"]
    assert "nvlink2-hybrid-cube-mesh from the gpu column" in out[("m", "8")]["assumptions"]
    assert "PCIe 3 (pcie3) assumed" in out[("j", "8")]["assumptions"]
    assert out[("n", "4")]["reason"].startswith("params blank")
    assert "no 1-GPU row" in out[("x", "16")]["reason"]


def test_validate_names_missing_columns(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("table_id,gpus,model\n1,1,x\n")
    assert main(["validate", "--published", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s)" in err and "images_per_s" in err


def _rows_from_model(cv, contention, board=0.0):
    """Published-like rows the model itself produced: DALI rows with only the straggler
    term, CPU-loader rows with host contention too, and a K80 (dual-GPU board) series with
    the board loss."""
    rows = []
    loaders = ["real, DALI (GPU)", "real, DALI (GPU)", "real, tf.data (CPU)", "real, DALI (GPU)"]
    for i, loader in enumerate(loaders):
        base = {
            "table_id": str(i),
            "source_path": f"doc{i}@0",
            "framework": "MXNet" if i != 2 else "TensorFlow 1 (Horovod)",
            "model": "ResNet-50",
            "gpu": "Tesla K80 (AWS p2.8xlarge)" if i == 3 else "A100 (DGX A100)",
            "batch_per_gpu": str(64 * (i + 1)),
            "precision": "AMP",
            "params": "25557032",
            "interconnect": "nvlink3-nvswitch",
            "data_source": loader,
        }
        rows.append({**base, "gpus": "1", "images_per_s": "2500"})
        for n in (2, 4, 8):
            rows.append({**base, "gpus": str(n), "images_per_s": "1"})
    cases = published.prepare(rows)
    for c in cases:
        if c["reason"]:
            continue
        f = contention if c["input"] == "cpu" else 0.0
        loss = cv * c["e_gpus"] + f * c["share"] + board * c["board"]
        step = c["compute_s"] * (1 + loss) + c["exposed_s"]
        c["row"]["images_per_s"] = str(c["gpus"] * c["batch"] / step)
    return rows


def test_fit_recovers_parameters_it_generated():
    params = fitting.fit(published.prepare(_rows_from_model(0.02, 0.06)))
    assert params.sync_cv == pytest.approx(0.02)
    assert dict(params.pooled_contention)[("cpu", "reduced")] == pytest.approx(0.06, abs=1e-3)
    assert dict(params.pooled_contention)[("gpu", "reduced")] == 0.0
    assert params.board_loss == 0.0
    # with a dual-GPU board's loss in its K80 series, the fit finds that too
    params = fitting.fit(published.prepare(_rows_from_model(0.02, 0.06, board=0.03)))
    assert (params.sync_cv, params.board_loss) == pytest.approx((0.02, 0.03))
    assert dict(params.pooled_contention)[("cpu", "reduced")] == pytest.approx(0.06, abs=1e-3)


def test_dual_gpu_board_loss_from_two_gpus_on():
    # A K80 board holds two GPUs: its 1-GPU row ran with the board's other GPU idle, so from
    # 2 GPUs on each step loses board_loss x compute; a single-GPU board (K40) never does.
    assert presets.dual_gpu_board("Tesla K80 (GCE n1-standard-32-k80x8)")
    assert presets.dual_gpu_board("Tesla M60") and presets.dual_gpu_board("GeForce GTX 690")
    assert not presets.dual_gpu_board("Tesla K40m") and not presets.dual_gpu_board("V100")
    assert presets.MAX_BOARD_LOSS == pytest.approx(1 - 562 / 875)
    base = {"table_id": "1", "framework": "MXNet", "model": "ResNet-50", "batch_per_gpu": "64"}
    base |= {"params": "25557032", "interconnect": "pcie3", "data_source": "synthetic"}
    rows = [
        {**base, "table_id": gpu, "gpu": gpu, "gpus": str(n), "images_per_s": str(50 * n)}
        for gpu in ("Tesla K80", "Tesla K40m")
        for n in (1, 2, 8)
    ]
    params = dataclasses.replace(SHIPPED, board_loss=0.05)
    cases = [c for c in published.prepare(rows) if not c["reason"]]
    for c in cases:
        p = published.predict_case(c, params)
        without = published.predict_case(c, dataclasses.replace(params, board_loss=0.0))
        expected = 0.05 * c["compute_s"] if c["row"]["gpu"] == "Tesla K80" else 0.0
        assert p["board_s"] == pytest.approx(expected)
        assert p["step_s"] == pytest.approx(without["step_s"] + expected)


@pytest.fixture(scope="module")
def shared_cases():
    return published.prepare(published.read_published(PUBLISHED, TF_CNN))


def test_shipped_fit_reproduces_from_the_shared_tables(shared_cases):
    # fitted.json is what `fit --write` produced: refitting the tests/data copies gives it
    # back (a model change means re-running fit, not editing numbers).
    params = fitting.fit(shared_cases)
    assert params.sync_cv == SHIPPED.sync_cv
    assert params.node_sync_cv == SHIPPED.node_sync_cv
    assert params.contention == SHIPPED.contention
    assert params.pooled_contention == SHIPPED.pooled_contention
    assert params.board_loss == SHIPPED.board_loss
    assert params.rows == SHIPPED.rows


def test_out_of_sample_figures_and_coverage_recomputed(shared_cases):
    figures = validate_module.out_of_sample_figures(shared_cases)
    by_source, by_generation = figures["source"], figures["generation"]
    # the committed summary reports exactly these figures, leaving sources out and leaving
    # GPU generations out
    summary = (RESULTS / "summary.md").read_text()
    loso_part, loho_part = summary.split("**Leave one GPU generation out")[:2]
    for part, f in ((loso_part, by_source), (loho_part, by_generation)):
        line = f"| all rows | {f['rows']} | {f['mae']:.1f} | {f['naive_mae']:.1f} |"
        assert line in part
        assert f"{f['coverage']:.0f}% |" in part
    # better than the linear guess out of sample, in every framework family, both ways
    for f in (by_source, by_generation):
        assert f["mae"] < f["naive_mae"]
        by_family: dict = {}
        for c in fitting.fittable(shared_cases):
            error = abs(f["predictions"][id(c)]["efficiency"] - c["published_efficiency"])
            naive = abs(1 - c["published_efficiency"])
            by_family.setdefault(c["family"], []).append((error, naive))
        for family, pairs in by_family.items():
            assert sum(e for e, _ in pairs) < sum(n for _, n in pairs), family
        # the 80% intervals, built without the left-out rows, within 10 points of 80%
        assert 70 <= f["coverage"] <= 90
    # each source's own rows, left out, covered at a spread the summary states
    per_source: dict = {}
    for c in fitting.fittable(shared_cases):
        low, high = by_source["intervals"][id(c)]
        inside = low - 1e-9 <= c["published_efficiency"] <= high + 1e-9
        per_source.setdefault(c["source"], []).append(inside)
    shares = sorted(100 * sum(v) / len(v) for v in per_source.values())
    assert len(shares) == 14 and shares[0] < 80 < shares[-1]
    assert f"left out: {shares[0]:.0f}% to {shares[-1]:.0f}% over 14 sources" in loso_part
    # the interval quantiles shipped are those of these out-of-sample errors, pooled
    shipped = fitting.residual_quantiles(
        shared_cases, by_source["predictions"], by_generation["predictions"]
    )
    assert shipped == SHIPPED.residual_quantiles
    key, (q10, q90, count) = shipped[0]
    assert key == "all" and count == 2 * by_source["rows"] and q10 < 0 < q90
    groups = {validate_module.group_label(c) for c in fitting.fittable(shared_cases)}
    assert {k for k, _ in shipped[1:]} <= groups
    assert all(n >= fitting.MIN_GROUP_ERRORS for _, (_, _, n) in shipped[1:])


def test_intervals_pool_both_ways_of_leaving_out():
    # Ten PyTorch DDP rows and five MXNet rows, each predicted twice out of sample (a source
    # left out, a generation left out). All rows' quantiles are those of all thirty errors;
    # DDP's twenty errors give it its own, and a DDP row's interval is the wider of the two:
    # [prediction - q90, prediction - q10], clipped to [0, 1.02]. MXNet's ten errors are too
    # few: its rows take all rows'.
    def rows(family, scheme, n):
        case = {"reason": "", "published_efficiency": 0.9, "family": family}
        return [{**case, "scheme": presets.SCHEMES[scheme]} for _ in range(n)]

    ddp, mxnet = rows("pytorch", "ddp", 10), rows("mxnet", "mxnet", 5)
    by_source = {id(c): {"efficiency": 0.9 + 0.01 * i} for i, c in enumerate(ddp)}
    by_generation = {id(c): {"efficiency": 0.8 + 0.02 * i} for i, c in enumerate(ddp)}
    by_source |= {id(c): {"efficiency": 0.95} for c in mxnet}
    by_generation |= {id(c): {"efficiency": 0.97} for c in mxnet}
    ddp_errors = [0.01 * i for i in range(10)] + [-0.1 + 0.02 * i for i in range(10)]
    all_errors = ddp_errors + [0.05] * 5 + [0.07] * 5
    quantiles = fitting.residual_quantiles(ddp + mxnet, by_source, by_generation)
    assert [(k, n) for k, (_, _, n) in quantiles] == [("all", 30), ("pytorch / ddp", 20)]
    for (_, (q10, q90, _)), errors in zip(quantiles, (all_errors, ddp_errors)):
        assert q10 == pytest.approx(np.quantile(errors, 0.1), abs=1e-4)
        assert q90 == pytest.approx(np.quantile(errors, 0.9), abs=1e-4)
    q10 = min(np.quantile(all_errors, 0.1), np.quantile(ddp_errors, 0.1))
    q90 = max(np.quantile(all_errors, 0.9), np.quantile(ddp_errors, 0.9))
    low, high = fitting.interval(0.95, quantiles, "pytorch / ddp")
    assert (low, high) == pytest.approx((0.95 - q90, 0.95 - q10), abs=1e-4)
    all_q10, all_q90 = np.quantile(all_errors, [0.1, 0.9])
    low, high = fitting.interval(0.9, quantiles, "mxnet / mxnet")
    assert (low, high) == pytest.approx((0.9 - all_q90, 0.9 - all_q10), abs=1e-4)
    assert fitting.interval(1.0, quantiles, "pytorch / ddp")[1] == 1.02
    # BUSI's rows (JAX, XLA combining) are in no published group: all rows' quantiles
    assert SHIPPED.interval("jax / xla")[2] == "all"


def test_interval_quantiles_weigh_each_source_once(monkeypatch):
    # Source A: 18 rows predicted exactly (error 0), source B: one row 10 points optimistic,
    # each row predicted twice (a source left out, a generation left out). By rows, B's two
    # errors are 2 of 38 and the 90th percentile is 0; each source counting once, A's 36
    # errors weigh 1/18 each and B's two 1 each, so half the weight sits at +0.1: sorted, B's
    # errors stand at (weight before them) / (total less the last's) = 2/3 and 3/3, and
    # q90 = 0.1, q10 = 0.
    def rows(source, n, predicted):
        case = {"reason": "", "published_efficiency": 0.9, "family": "pytorch"}
        out = [{**case, "scheme": presets.SCHEMES["ddp"], "source": source} for _ in range(n)]
        return out, {id(c): {"efficiency": predicted} for c in out}

    a, a_pred = rows("A/README.md", 18, 0.9)
    b, b_pred = rows("B/README.md", 1, 1.0)
    predictions = a_pred | b_pred
    quantiles = fitting.residual_quantiles(a + b, predictions, predictions)
    assert quantiles[0] == ("all", (0.0, 0.1, 38))
    assert fitting.weighted_quantile([0.0] * 36 + [0.1] * 2, [1 / 18] * 36 + [1, 1], 0.5) == 0
    monkeypatch.setattr(fitting, "SOURCE_WEIGHTED_INTERVALS", False)
    assert fitting.residual_quantiles(a + b, predictions, predictions)[0] == (
        "all",
        (0.0, 0.0, 38),
    )


def test_no_prediction_above_linear(shared_cases):
    for c in shared_cases:
        p = published.predict_case(c)
        if p is not None:
            assert 0 < p["efficiency"] <= 1.0


def test_busi_question_against_hand_computation(tmp_path):
    from bcjax.timing.scaling_model import busi

    rows = busi.busi_rows()
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["devices"] == 1)
    # ResNet-18 (3 classes) over NVLink 4, global batch 32 on 2 GPUs: compute from the two
    # H100 points; the step adds the exposed XLA all-reduce, sync and host terms.
    per_image = (128 / 14_265 - 32 / 9_179) / 96
    compute = lambda b: 32 / 9_179 + per_image * (b - 32)  # noqa: E731
    row = next(
        r
        for r in rows
        if (r["model"], r["link"], r["global_batch"], r["devices"])
        == ("resnet18", "nvlink4-nvswitch", 32, 2)
    )
    terms_2 = busi.step_terms(compute(16), busi.profile_of("resnet18"), 2, "nvlink4-nvswitch")
    assert row["speedup"] == pytest.approx(compute(32) / terms_2["step_s"])
    assert row["low"] <= row["speedup"] <= row["high"]
    # a 2-GPU box has no 4- or 8-GPU rows
    assert {r["devices"] for r in rows if r["link"] == "pcie3-2gpu-nop2p"} == {1, 2}
    assert busi.verdict(0.8, 0.95) == "slower"
    assert busi.verdict(0.95, 1.05) == "straddles 1.0x: cannot tell"
    assert busi.verdict(1.05, 1.2) == "faster"
    text = busi.write_busi_question(tmp_path)
    assert (tmp_path / "busi_question.md").exists() and "| resnet18 |" in text


def test_no_machine_paths_in_the_package():
    # The repository names only its own files: no absolute path of a developer's machine
    # (the pattern is spelled so that this file does not contain what it looks for).
    machine_path = re.compile(r"/(?:work|root|home|tmp)/[A-Za-z]")
    root = pathlib.Path(sm.__file__).parent
    for path in list(root.glob("*.py")) + [root / "fitted.json"]:
        assert not machine_path.search(path.read_text()), path
