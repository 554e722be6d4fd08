"""The gradient communication of one step, scheduled as the framework issues it.

Gradients become ready layer by layer from the output back (``profiles``); the framework
groups them into calls (its ``presets.Scheme``); the calls run one after another on one
link; what still runs when the backward pass ends is exposed. Each function is small and
pure so that a test can check it against a hand computation on a toy model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bcjax.timing.scaling_model.presets import Scheme

Message = tuple[float, float]  # (seconds into the backward when it may start, bytes)


def ready_times(profile: Sequence, backward_s: float, bytes_per_param: float) -> list[Message]:
    """(ready time, gradient bytes) per layer in backward order (output layer first): layer
    i is ready when the backward has done the FLOPs of layers i..end."""
    flops = [max(float(f), 0.0) for _, _, f in profile]
    total = sum(flops) or float(len(flops))
    if not sum(flops):
        flops = [1.0] * len(flops)
    out, done = [], 0.0
    for (_, params, _), f in zip(reversed(profile), reversed(flops)):
        done += f
        out.append((backward_s * done / total, params * bytes_per_param))
    return out


def buckets(grads: Sequence[Message], bucket_bytes: float, first_bytes: float = 0.0):
    """DDP / XLA / Paddle: gradients fill buckets in backward order; a bucket goes when its
    last gradient is ready (a tensor larger than a bucket goes alone; DDP's first bucket is
    smaller, ``first_bytes``)."""
    out, size, ready = [], 0.0, 0.0
    cap = first_bytes or bucket_bytes
    for t, nbytes in grads:
        if size and size + nbytes > cap:
            out.append((ready, size))
            size, cap = 0.0, bucket_bytes
        size += nbytes
        ready = t
    if size:
        out.append((ready, size))
    return out


def fusion_cycles(grads: Sequence[Message], threshold: float, cycle_s: float) -> list[Message]:
    """Horovod: every ``cycle_s`` the background thread takes the gradients ready by then and
    reduces them in fusion buffers of up to ``threshold`` bytes."""
    pending = sorted(grads)
    out: list[Message] = []
    tick = 0.0
    while pending:
        tick += cycle_s
        ready = [g for g in pending if g[0] <= tick + 1e-15]
        if not ready:
            tick = max(tick, cycle_s * int(pending[0][0] / cycle_s))
            continue
        pending = pending[len(ready) :]
        size = 0.0
        for _, nbytes in ready:
            if size and size + nbytes > threshold:
                out.append((tick, size))
                size = 0.0
            size += nbytes
        out.append((tick, size))
    return out


def messages(grads: Sequence[Message], scheme: Scheme) -> list[Message]:
    """The calls a scheme issues for these gradients."""
    if scheme.kind == "bucketed":
        return buckets(grads, scheme.bucket_bytes, scheme.first_bucket_bytes)
    if scheme.kind == "fusion":
        return fusion_cycles(grads, scheme.bucket_bytes, scheme.cycle_s)
    return list(grads)  # per_tensor and parameter_server: one transfer per gradient


def finish_after(msgs: Sequence[Message], cost: Callable[[float], float], window_s: float):
    """Seconds the calls run past ``window_s``: one after another on one link, each from
    max(its ready time, the previous call's end)."""
    t = 0.0
    for ready, nbytes in sorted(msgs):
        t = max(t, ready) + cost(nbytes)
    return max(0.0, t - window_s)


def pull_stall(profile: Sequence, forward_s: float, cost: Callable[[float], float], bpp: float):
    """Parameter server, the other way: variables come back in forward order and layer i
    cannot start before its variables have arrived; the stall is the largest lateness."""
    flops = [max(float(f), 0.0) for _, _, f in profile]
    total = sum(flops) or 1.0
    t, need, stall = 0.0, 0.0, 0.0
    for (_, params, _), f in zip(profile, flops):
        t += cost(params * bpp)
        stall = max(stall, t - need)
        need += forward_s * f / total
    return stall


def exposed_time(grads: Sequence[Message], scheme: Scheme, cost, backward_s: float) -> float:
    """All-reduce schemes: the scheme's calls against the backward pass; a scheme that does
    not overlap starts its first call when the backward ends."""
    msgs = messages(grads, scheme)
    if not scheme.overlaps:
        msgs = [(backward_s, nbytes) for _, nbytes in msgs]
    return finish_after(msgs, cost, backward_s)
