"""Command line: ``python -m fl_core run --profile P --method M [--set key=value ...] [--run-dir DIR]``.

The last line on stdout is one JSON object with the final metrics and the run record's path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fl_core.config import DEFAULT_PROFILE, METHODS, PROFILES, make_config, parse_set_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fl_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume, or reuse) one federated experiment")
    run.add_argument("--profile", default=DEFAULT_PROFILE, help=f"one of {', '.join(PROFILES)} (default {DEFAULT_PROFILE})")
    run.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default: the profile's)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, e.g. --set fl.rounds=5 --set data.alpha=0.1 (repeatable)")
    run.add_argument("--run-dir", default=None, help="run directory (default: $FL_CORE_RUNS or ./runs, by config hash)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub unless asked
    try:
        overrides = parse_set_args(args.overrides)
        if args.method is not None:
            overrides["method.name"] = args.method
        cfg = make_config(args.profile, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fl_core.data import DataNotFoundError
    from fl_core.experiment import run_experiment

    try:
        record = run_experiment(cfg, args.run_dir, progress=not args.no_progress)
    except (ValueError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    final = record["final"]
    summary = {"top1": final["top1"], **{g: final[g] for g in ("many", "medium", "few", "head", "middle", "tail")},
               "method": cfg.method.name, "profile": cfg.profile, "rounds": len(record["rounds"]),
               "run_record": record["_path"]}
    print(f"run record: {record['_path']}")
    print("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                if k in ("top1", "many", "medium", "few", "head", "middle", "tail")))
    print(json.dumps(summary))
    return 0
