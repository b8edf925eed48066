"""Time the standard sweep sequentially (``fit`` per run) and stacked (``fit_many`` per arm).

The standard sweep: seeds × learning rates × two arms (plain and batch-normalised MLP,
4 hidden layers of width 64, the chapters' usual size: most MLP configs in
``bnlib/experiments`` are 64 wide) on digits, 300 steps of batch 64, evaluation on val and test
every 10 steps, with bnlib's thread policy (one thread unless ``$BNLIB_THREADS``).

    python benchmarks/bench_runs.py               # the standard sweep (8 seeds × 5 lrs × 2 arms)
    python benchmarks/bench_runs.py --width 128   # wider layers: more arithmetic per operation
    python benchmarks/bench_runs.py --quick       # a tiny version (a few seconds)
    python benchmarks/bench_runs.py --repeats 3

Times are CPU seconds of this process (``time.process_time``) for the whole call (building,
training, evaluating, tidying): on a shared machine, descheduling does not land on one way
(with one thread, CPU time is the wall time of an idle machine). Wall seconds are printed
too. The median over ``--repeats``; the last line is ``batched/sequential speedup: X.XX×``
(sequential CPU time / stacked CPU time).
It also checks that the two ways agree (final test accuracies within 1e-3 per run).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from bnlib import data as datasets
from bnlib import provenance, runtime
from bnlib.models import MLPSpec
from bnlib.stacked import Member, fit_many
from bnlib.train import TrainSpec, fit


def sweep(quick: bool, width: int = 64) -> tuple[list[MLPSpec], TrainSpec, list[int], list[float]]:
    if quick:
        arms = [MLPSpec(depth=2, width=32, norm=n) for n in ("none", "batch")]
        return arms, TrainSpec(steps=40, batch_size=64, eval_every=10, device="cpu"), \
            [0, 1, 2, 3], [0.03, 0.1]
    arms = [MLPSpec(depth=4, width=width, norm=n) for n in ("none", "batch")]
    return (arms, TrainSpec(steps=300, batch_size=64, eval_every=10, device="cpu"),
            list(range(8)), [0.01, 0.03, 0.1, 0.3, 1.0])


def run_sequential(arms, spec, data, seeds, lrs) -> tuple[float, float, list]:
    """(CPU s, wall s, histories) of one ``fit`` per run."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = [fit(arm, dataclasses.replace(spec, lr=lr), data, s)
           for arm in arms for lr in lrs for s in seeds]
    return time.process_time() - c0, time.perf_counter() - w0, out


def run_stacked(arms, spec, data, seeds, lrs) -> tuple[float, float, list]:
    """(CPU s, wall s, histories) of one ``fit_many`` per arm."""
    c0, w0 = time.process_time(), time.perf_counter()
    members = [Member(seed=s, lr=lr) for lr in lrs for s in seeds]
    out = [df for arm in arms for df in fit_many(arm, spec, data, members)]
    return time.process_time() - c0, time.perf_counter() - w0, out


def final_acc(df) -> float:
    test = df[df.split == "test"]
    return float(test.accuracy.iloc[-1]) if len(test) else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny sweep (seconds)")
    ap.add_argument("--repeats", type=int, default=1, help="timings per way (median reported)")
    ap.add_argument("--width", type=int, default=64, help="hidden width of the MLPs (default 64)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.width < 1:
        print("error: --repeats and --width must be ≥ 1", file=sys.stderr)
        return 2
    arms, spec, seeds, lrs = sweep(args.quick, args.width)
    data = datasets.load("digits")
    runs = len(arms) * len(seeds) * len(lrs)
    print(f"{provenance.device_name(torch.device('cpu'))}, torch {torch.__version__}, {runtime.threads()} thread(s)")
    print(f"sweep: {len(arms)} arms of depth {arms[0].depth}, width {arms[0].width} × {len(lrs)} lrs "
          f"× {len(seeds)} seeds = {runs} runs, "
          f"{spec.steps} steps, batch {spec.batch_size}, eval every {spec.eval_every}")
    seq_t, bat_t = [], []
    for r in range(args.repeats):
        t, w, seq = run_sequential(arms, spec, data, seeds, lrs)
        seq_t.append(t)
        print(f"repeat {r + 1}: sequential {t:.2f} s CPU ({w:.2f} s wall)", end=", ", flush=True)
        t, w, bat = run_stacked(arms, spec, data, seeds, lrs)
        bat_t.append(t)
        print(f"stacked {t:.2f} s CPU ({w:.2f} s wall)", flush=True)
    worst = max(abs(final_acc(a) - final_acc(b)) for a, b in zip(seq, bat)
                if not (a.diverged.any() or b.diverged.any()))
    div = sum(bool(a.diverged.any()) != bool(b.diverged.any()) for a, b in zip(seq, bat))
    print(f"agreement: max |Δ final test accuracy| = {worst:.2g}, divergence flags differ in {div} runs")
    s, b = statistics.median(seq_t), statistics.median(bat_t)
    print(f"sequential: {s:.2f} s CPU ({s / runs * 1e3:.0f} ms/run), stacked: {b:.2f} s CPU "
          f"({b / runs * 1e3:.0f} ms/run), median of {args.repeats}")
    print(f"batched/sequential speedup: {s / b:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
