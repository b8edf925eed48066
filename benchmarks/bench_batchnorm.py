"""Time bnlib's batch norm against torch's native one.

For an MLP-shaped input ``(256, 512)`` (``BatchNorm1d``) and a CNN-shaped input
``(64, 64, 32, 32)`` (``BatchNorm2d``) it times, in training and in evaluation mode, the
forward pass and the forward + backward pass of both implementations. The two
implementations are *interleaved* (A B, then B A, and so on) so that slow drifts of the
machine (other processes, clock changes, thermal throttling) hit both alike and neither
always runs first; each measurement is the median, with the interquartile range, of many
repeats. On CUDA every timed call is
bracketed by ``torch.cuda.synchronize()`` and preceded by warm-up calls.

Usage::

    python benchmarks/bench_batchnorm.py                   # CPU, 2 threads
    python benchmarks/bench_batchnorm.py --device cuda --repeats 200
    python benchmarks/bench_batchnorm.py --threads 1 --repeats 50 --clock cpu

It prints a Markdown table (times in microseconds, ratio = bnlib / torch; below 1 means
bnlib is faster).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnlib  # noqa: E402
from bnlib import nn as bnn  # noqa: E402
from bnlib.provenance import device_name  # noqa: E402

SHAPES = {
    "MLP (256, 512), BatchNorm1d": ((256, 512), nn.BatchNorm1d, bnn.BatchNorm1d),
    "CNN (64, 64, 32, 32), BatchNorm2d": ((64, 64, 32, 32), nn.BatchNorm2d, bnn.BatchNorm2d),
}


def make_step(layer: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call to time: forward (no autograd graph) or forward + backward."""
    if not backward:
        def step() -> None:
            with torch.no_grad():
                layer(x)
        return step
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer(xg).backward(grad)
        xg.grad = None
        layer.weight.grad = None
        layer.bias.grad = None
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step: Callable[[], None], device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds for one call of ``step`` (synchronising the GPU before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t0


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bench(shape, torch_cls, bnlib_cls, *, mode: str, backward: bool, device: torch.device,
          repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median and IQR (µs) of both implementations, measured interleaved."""
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device)
    layers = {"torch": torch_cls(shape[1]).to(device), "bnlib": bnlib_cls(shape[1]).to(device)}
    for layer in layers.values():
        layer.train(mode == "train")
    steps = {name: make_step(layer, x, backward) for name, layer in layers.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {"torch": [], "bnlib": []}
    for i in range(repeats):
        order = ("torch", "bnlib") if i % 2 == 0 else ("bnlib", "torch")  # ABBA: no order bias
        for name in order:
            times[name].append(timed(steps[name], device, clock))
    out = {}
    for name, values in times.items():
        q1, med, q3 = quartiles([v * 1e6 for v in values])
        out[name] = (med, q3 - q1)
    out["ratio"] = out["bnlib"][0] / out["torch"][0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--repeats", type=int, default=100, help="timed calls per implementation")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, which a "
                        "busy shared machine disturbs less (CPU only, best with --threads 1)")
    args = p.parse_args(argv)
    if args.repeats < 4:
        p.error("--repeats must be at least 4 (quartiles)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but no CUDA GPU is available")
    if device.type == "cuda" and args.clock != "wall":
        p.error("--clock cpu measures CPU time only; use the wall clock on CUDA")
    torch.set_num_threads(args.threads)
    dev_name = device_name(device)

    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    print(f"bnlib {bnlib.__version__} vs torch {torch.__version__} native batch norm — "
          f"{dt.date.today().isoformat()}, {dev_name}, device={device}, "
          f"threads={torch.get_num_threads()}, repeats={args.repeats}, {args.clock} clock, "
          f"float32{load}\n")
    print("| input | mode | pass | torch µs (IQR) | bnlib µs (IQR) | bnlib / torch |")
    print("|---|---|---|---:|---:|---:|")
    for label, (shape, torch_cls, bnlib_cls) in SHAPES.items():
        for mode in ("train", "eval"):
            for backward in (False, True):
                r = bench(shape, torch_cls, bnlib_cls, mode=mode, backward=backward, device=device,
                          repeats=args.repeats, warmup=args.warmup, clock=CLOCKS[args.clock])
                kind = "fwd+bwd" if backward else "fwd"
                print(f"| {label} | {mode} | {kind} | {r['torch'][0]:.0f} ({r['torch'][1]:.0f}) "
                      f"| {r['bnlib'][0]:.0f} ({r['bnlib'][1]:.0f}) | {r['ratio']:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
