"""Time bnlib's batch norm against torch's native one and two teaching implementations.

For an MLP-shaped input ``(256, 512)`` (``BatchNorm1d``) and a CNN-shaped input
``(64, 64, 32, 32)`` (``BatchNorm2d``) it times, in training and in evaluation mode, the
forward pass and the forward + backward pass of

* ``native``: ``torch.nn.BatchNorm1d/2d``;
* ``bnlib``: ``bnlib.nn.BatchNorm1d/2d``;
* ``d2l-style``: a layer that lets autograd differentiate through its mean and variance;
* ``CS231n NumPy layer`` / ``raw``: NumPy forward and closed-form backward, wrapped as a
  PyTorch layer, and on bare arrays (no autograd at all);

and counts the bytes a training step saves for its backward pass. The implementations
are *interleaved* (a fresh random order in every repeat) so that slow spells of a shared
machine hit all of them alike; the clock is this process's CPU time on the CPU (all
threads together) and wall time between synchronisations on CUDA. Each entry is the
median, with the interquartile range, of ``--repeats`` calls. The machinery lives in
:mod:`bnlib.benchmark`.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_batchnorm.py --threads 1 --csv run1.csv
    OMP_NUM_THREADS=2 python benchmarks/bench_batchnorm.py --threads 2 --csv run2.csv
    python benchmarks/bench_batchnorm.py --summarize run1.csv run2.csv ...  # medians of runs
    python benchmarks/bench_batchnorm.py --device cuda --repeats 200
    python benchmarks/bench_batchnorm.py --breakdown --repeats 60  # where the time goes

It prints Markdown tables (times in microseconds; ratio = implementation / native, below 1
means faster than torch's kernel).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnlib  # noqa: E402
from bnlib import benchmark as B  # noqa: E402
from bnlib.provenance import device_name  # noqa: E402


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def goal_table(df: pd.DataFrame) -> str:
    """bnlib against native, every pass: medians (IQR) and the ratio."""
    lines = ["| input | pass | native µs (IQR) | bnlib µs (IQR) | bnlib / native |",
             "|---|---|---:|---:|---:|"]
    for (inp, p), g in df.groupby(["input", "pass"], sort=False):
        r = g.set_index("implementation")
        if "bnlib" not in r.index or "native" not in r.index:
            continue
        n, b = r.loc["native"], r.loc["bnlib"]
        lines.append(f"| {inp} | {p} | {_fmt(n.median_us)} ({_fmt(n.iqr_us)}) | "
                     f"{_fmt(b.median_us)} ({_fmt(b.iqr_us)}) | {b.ratio:.2f}× |")
    return "\n".join(lines)


def teaching_table(df: pd.DataFrame) -> str:
    """Every implementation, training forward + backward and evaluation forward."""
    impls = [i for i in B.IMPLEMENTATIONS if i in set(df["implementation"])]
    lines = ["| input | pass | " + " | ".join(impls) + " |",
             "|---|---|" + "---:|" * len(impls)]
    for (inp, p), g in df.groupby(["input", "pass"], sort=False):
        if p not in ("train fwd+bwd", "eval fwd"):
            continue
        r = g.set_index("implementation")
        cells = [f"{_fmt(r.loc[i].median_us)} ({r.loc[i].ratio:.2f}×)" if i in r.index else "–"
                 for i in impls]
        lines.append(f"| {inp} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_markdown(mem: pd.DataFrame) -> str:
    lines = ["| input | implementation | saved for backward | of which beyond the input | / native |",
             "|---|---|---:|---:|---:|"]
    for row in mem.itertuples():
        lines.append(f"| {row.input} | {row.implementation} | {row.saved_bytes / 2**20:.3f} MiB | "
                     f"{row.beyond_input_bytes / 2**20:.3f} MiB | {row.ratio:.2f}× |")
    return "\n".join(lines)


def summarize(paths: list[str]) -> pd.DataFrame:
    """Median over several runs' CSVs of each (threads, input, pass, implementation)."""
    runs = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    keys = ["threads", "input", "pass", "implementation"]
    out = runs.groupby(keys, sort=False).agg(median_us=("median_us", "median"),
                                             iqr_us=("iqr_us", "median"),
                                             ratio=("ratio", "median"),
                                             runs=("ratio", "size")).reset_index()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--repeats", type=int, default=25, help="timed calls per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--shapes", choices=["full", "tiny"], default="full",
                   help="full: the (256, 512) and (64, 64, 32, 32) inputs; tiny: a quick check")
    p.add_argument("--csv", help="also write the results (one row per entry) to this CSV")
    p.add_argument("--breakdown", action="store_true",
                   help="print where an MLP training step's CPU time goes (native vs bnlib)")
    p.add_argument("--summarize", nargs="+", metavar="CSV",
                   help="print the median over earlier runs' CSVs instead of timing")
    args = p.parse_args(argv)
    if args.summarize:
        try:
            s = summarize(args.summarize)
        except (OSError, KeyError, pd.errors.ParserError) as e:
            p.error(f"cannot summarise {args.summarize}: {e}")
        for threads, g in s.groupby("threads", sort=True):
            print(f"\n### {threads} thread(s), median of {int(g['runs'].min())}–"
                  f"{int(g['runs'].max())} runs\n")
            print(goal_table(g))
            print()
            print(teaching_table(g))
        return 0
    if args.breakdown:
        torch.set_num_threads(args.threads)
        for label, shape in (B.SHAPES if args.shapes == "full" else B.TINY_SHAPES).items():
            df = B.cost_breakdown(shape, repeats=max(args.repeats, 4))
            print(f"\n{label}: CPU µs per training step (median of {max(args.repeats, 4)})\n")
            print("| entry | µs |\n|---|---:|")
            for row in df.itertuples():
                print(f"| {row.entry} | {row.median_us:.0f} |")
        return 0
    if args.repeats < 4:
        p.error("--repeats must be at least 4 (quartiles)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but no CUDA GPU is available")
    shapes = B.SHAPES if args.shapes == "full" else B.TINY_SHAPES
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    clock = "CPU time" if device.type == "cpu" else "wall time"
    print(f"bnlib {bnlib.__version__}, torch {torch.__version__} — "
          f"{dt.date.today().isoformat()}, {device_name(device)}, device={device}, "
          f"threads={args.threads}, repeats={args.repeats}, {clock}, float32{load}\n")
    df = B.compare(shapes, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                   device=device)
    df.insert(0, "threads", args.threads)
    print(goal_table(df))
    print()
    print(teaching_table(df))
    if device.type == "cpu":
        print()
        print(memory_markdown(B.memory_table(shapes)))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
