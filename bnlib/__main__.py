"""Command line: ``python -m bnlib list | show NAME | run NAME [key=value ...] | doctor TARGET``.

``run`` writes ``results/NAME/``: ``NAME.csv`` (the tidy result), ``NAME.png`` (the chapter's
figure) and ``provenance.json`` (device, versions, commit, the command, start time and how
long the computation took). Any config field can be overridden as ``key=value`` (``seeds=0,1,2``,
``train.lr=0.3``, ``model.depth=16``), checked against the field's type. Results are cached by
config and library version (:mod:`bnlib.cache`): rerunning a finished command is instant, and
the notebooks reuse what the command line computed. ``show`` prints the resolved config.

Bad input (an unknown experiment or key, an ill-typed value, a device that is not there) is a
one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2), without the usage block."""

    def error(self, message: str):  # noqa: D401
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bnlib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list the experiments")
    for name, help_ in (("run", "run one experiment and record its result"),
                        ("show", "print an experiment's resolved config")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("name")
        r.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. seeds=0,1 train.lr=0.3")
        r.add_argument("--scale", choices=("quick", "full"), default=None,
                       help="preset (default: $BNLIB_SCALE or quick)")
        r.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps")
        r.add_argument("--seeds", default=None, help="comma-separated seeds (same as seeds=...)")
        if name == "show":
            r.add_argument("--json", action="store_true", help="print the config as JSON")
        else:
            r.add_argument("--out", default="results", help="folder for results (default: results)")
            r.add_argument("--no-plot", action="store_true", help="skip the PNG")
            r.add_argument("--no-cache", action="store_true",
                           help="recompute even when a cached result exists")
    d = sub.add_parser("doctor", help="check a model for batch-norm bugs",
                       add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _resolve(args):
    """The experiment and its config from the parsed arguments (ValueError/KeyError on bad input)."""
    from . import experiments
    from .train import resolve_device
    exp = experiments.get(args.name)
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.device is not None:
        resolve_device(args.device)  # a missing GPU is an error here, not an hour later
        overrides.append(f"device={args.device}")
    cfg = experiments.resolve(exp.name, args.scale, overrides)
    if hasattr(cfg, "device"):
        resolve_device(cfg.device)
    return exp, cfg


def _save_figure(exp, df, path: Path) -> bool:
    if exp.plot is None:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from . import plots
    plots.set_theme()
    result = exp.plot(df)
    fig = getattr(result, "figure", None) or (result if hasattr(result, "savefig") else plt.gcf())
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close("all")
    return True


def _run(args, argv: list[str]) -> int:
    from . import experiments
    from .config import to_dict
    exp, cfg = _resolve(args)
    out = Path(args.out) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    df = experiments.run(exp.name, args.scale, overrides=_overrides_of(cfg, exp),
                         cache_results=not args.no_cache)
    from .distributed import is_main
    if not is_main():  # under torchrun, rank 0 alone writes the results
        return 0
    prov = dict(df.attrs["provenance"])
    df.attrs = {}
    df.to_csv(out / f"{exp.name}.csv", index=False)
    files = [f"{exp.name}.csv"]
    if not args.no_plot and _save_figure(exp, df, out / f"{exp.name}.png"):
        files.append(f"{exp.name}.png")
    prov["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "bnlib", *argv])
    prov["config"] = to_dict(cfg)
    prov["seeds"] = list(getattr(cfg, "seeds", ()))
    prov["files"] = files
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    resumed = f", resumed from {prov['resumed_cells']} finished cells" if prov.get("resumed_cells") else ""
    print(f"{exp.name}: {len(df)} rows (computed in {prov['duration_seconds']:.1f} s on "
          f"{prov['device_name']}, {prov['started']}{resumed}) -> {out}/")
    return 0


def _overrides_of(cfg, exp) -> dict:
    """The resolved config as overrides of its preset (so run() rebuilds the same config)."""
    from .config import fields
    import dataclasses
    out = {}
    for key in fields(cfg):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not dataclasses.is_dataclass(value):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    try:
        if argv[:1] == ["doctor"]:
            args = parser.parse_args(argv)
        else:  # key=value overrides may come after options: collect the leftovers
            args, extra = parser.parse_known_args(argv)
            unknown = [a for a in extra if a.startswith("-") or "=" not in a]
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            if extra:
                args.overrides = list(args.overrides) + extra
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "doctor":
        from . import doctor
        return doctor.main(args.args)
    from . import experiments
    from .config import ConfigError, format_config, to_dict
    try:
        if args.command == "list":
            for name in experiments.names():
                exp = experiments.get(name)
                print(f"{name:28s} {exp.title}" + (f"  [chapter {exp.chapter}]" if exp.chapter else ""))
            return 0
        if args.command == "show":
            exp, cfg = _resolve(args)
            print(json.dumps(to_dict(cfg), indent=2, default=str) if args.json
                  else f"# {exp.name}: {exp.title}\n{format_config(cfg)}")
            return 0
        return _run(args, argv)
    except (ConfigError, KeyError, ValueError, RuntimeError, NotImplementedError) as e:
        message = e.args[0] if e.args else str(e)
        return _fail(str(message).splitlines()[0] if message else type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except BrokenPipeError:  # e.g. `python -m bnlib show NAME | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
