"""Command line: ``python -m bnlib list`` and ``python -m bnlib run NAME``.

``run`` writes ``results/NAME/``: ``NAME.csv`` (the tidy result), ``NAME.png`` (its
figure) and ``provenance.json`` (device, versions, commit, command, seeds, start time,
duration). Finished sweep cells are checkpointed under ``results/NAME/cells/``, so an
interrupted run picks up where it stopped when started again with the same options.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bnlib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run one experiment and record its result")
    r.add_argument("name")
    r.add_argument("--scale", choices=("quick", "full"), default=None,
                   help="preset to run (default: $BNLIB_SCALE or quick)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    r.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    r.add_argument("--out", default="results", help="folder for results (default: results)")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    from . import experiments
    from .train import resolve_device

    if args.command == "list":
        for name in experiments.names():
            exp = experiments.get(name)
            print(f"{name:28s} {exp.title}" + (f"  [chapter {exp.chapter}]" if exp.chapter else ""))
        return 0

    try:
        exp = experiments.get(args.name)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    overrides: dict = {"device": str(device)}
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    cfg = exp.config.preset(args.scale, **overrides)
    out = Path(args.out) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    with experiments.checkpointing(out / "cells" / experiments.config_hash(cfg)):
        df = exp.fn(cfg)
    seconds = time.perf_counter() - t0
    df.to_csv(out / f"{exp.name}.csv", index=False)
    files = [f"{exp.name}.csv"]
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from . import plots
        plots.set_theme()
        fig = plt.figure()
        if exp.plot is not None:
            result = exp.plot(df)
            fig = getattr(result, "figure", None) or (result if hasattr(result, "savefig") else plt.gcf())
        else:
            plt.close(fig)
            fig = None
        if fig is not None:
            fig.savefig(out / f"{exp.name}.png", dpi=120, bbox_inches="tight")
            files.append(f"{exp.name}.png")
            plt.close("all")
    from .provenance import record
    # the command as typed, also when main() is called in-process (sys.argv is then not ours)
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bnlib", *argv])
    prov = record(device=device, started=started, seconds=seconds, command=command,
                  experiment=exp.name,
                  scale=args.scale or __import__("bnlib").scale(), seeds=list(cfg.seeds),
                  config=dataclasses.asdict(cfg), rows=len(df), files=files)
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    print(f"{exp.name}: {len(df)} rows in {seconds:.1f} s on {prov['device_name']} -> {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
