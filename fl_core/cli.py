"""Command line of fl_core.

``python -m fl_core run --profile P --method M [--set key=value ...] [--run-dir DIR]`` runs one
federated experiment; ``python -m fl_core compare --profile P [--methods M ...] [--seeds S ...]
[--set ...] [--sweep KEY=V1,V2,...] [--markdown]`` runs methods x seeds (x the swept values; finished
runs reused, the rest one per core) and prints their results table; ``python -m fl_core annotate
--profile P [--set ...]`` annotates the web pool with the MLLM and scores the CLIP-role encoder
zero-shot, twice (the second from the cache); ``python -m fl_core config --profile P [--method M]
[--set ...]`` prints the config a run would use, key by key, and where its run is.
The last line on stdout is always one JSON object.
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

    def command(name: str, help: str, set_example: str, progress: bool = True) -> argparse.ArgumentParser:
        one = sub.add_parser(name, help=help)
        one.add_argument("--profile", default=DEFAULT_PROFILE, help=f"one of {', '.join(PROFILES)} (default {DEFAULT_PROFILE})")
        one.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                         help=f"config overrides, e.g. {set_example} (one or more after each --set; `config` "
                              "lists the keys)")
        if progress:
            one.add_argument("--no-progress", action="store_true", help="no progress bars")
        return one

    def method_option(one: argparse.ArgumentParser) -> None:
        one.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default: the profile's)")

    run = command("run", "run (or resume, or reuse) one federated experiment", "--set fl.rounds=5 data.alpha=0.1")
    method_option(run)
    run.add_argument("--run-dir", default=None, help="run directory (default: $FL_CORE_RUNS or ./runs, by config hash)")
    compare = command("compare", "run methods x seeds (finished runs reused) and print their results table",
                      "--set data.imbalance_factor=50")
    compare.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                         help=f"any of {', '.join(METHODS)} (default: all)")
    compare.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                         help="default: the profile's (7 8 9; 7 on smoke)")
    compare.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                         help="also vary one config key, e.g. --sweep data.alpha=0.1,0.5,1.0: top-1, last 3 and tail "
                              "per value")
    compare.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    command("annotate", "annotate the web pool with the MLLM (cached) and report its accuracy",
            "--set teacher.mllm_accuracy=0.7")
    method_option(command("config", "print every config key of a run: its value, where it was set, what it means; "
                                    "and the run's directory", "--set fl.rounds=5", progress=False))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub unless asked
    try:
        overrides = parse_set_args(args.overrides)
        if getattr(args, "method", None) is not None:
            overrides["method.name"] = args.method
        cfg = make_config(args.profile, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fl_core.data import DataNotFoundError
    from fl_core.teachers import TeacherUnavailableError

    try:
        if args.command == "config":
            return config_command(cfg, overrides)  # runs nothing, so writes nothing: no folder check
        check_folders(args)
        if args.command == "annotate":
            return annotate_command(cfg, progress=not args.no_progress)
        if args.command == "compare":
            return compare_command(cfg.profile, args.methods, args.seeds, overrides, parse_sweep(args.sweep),
                                   args.markdown, progress=not args.no_progress)
        return run_command(cfg, args.run_dir, progress=not args.no_progress)
    except (ValueError, DataNotFoundError, TeacherUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into `head`: what it wanted is printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: completed rounds (and teacher outputs) are saved; the same command resumes from there",
              file=sys.stderr)
        return 130


def check_folders(args: argparse.Namespace) -> None:
    """The teacher cache's folder, and the runs' where the command writes runs, can be written."""
    from fl_core.experiment import runs_root
    from fl_core.results import check_writable_folder
    from fl_core.teachers.cache import cache_root

    check_writable_folder(cache_root(), "set FL_CORE_CACHE to a folder you can write")
    if getattr(args, "run_dir", None) is not None:
        check_writable_folder(args.run_dir, "pass a --run-dir you can write")
    elif args.command != "annotate":
        check_writable_folder(runs_root(), "set FL_CORE_RUNS to a folder you can write, or pass --run-dir")


def run_command(cfg, run_dir, progress: bool) -> int:
    from fl_core.experiment import run_experiment

    record = run_experiment(cfg, run_dir, progress=progress)
    final = record["final"]
    summary = {"top1": final["top1"], **{g: final[g] for g in ("many", "medium", "few", "head", "middle", "tail")},
               "method": cfg.method.name, "profile": cfg.profile, "rounds": len(record["rounds"]),
               "run_record": record["_path"]}
    print(f"run record: {record['_path']}")
    print("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                if k in ("top1", "many", "medium", "few", "head", "middle", "tail")))
    print(json.dumps(summary))
    return 0


def config_command(cfg, overrides: dict) -> int:
    """Every key as ``key=value`` (the form ``--set`` takes), whether the profile or ``--set`` gave it,
    what it means and its valid values; then the run's directory and how far its run is."""
    from fl_core.config import ExperimentConfig, key_choices, key_notes
    from fl_core.experiment import default_run_dir
    from fl_core.results import RECORD_NAME, load_record

    values = {key: json.dumps(v) if isinstance(v, bool) else str(v) for key, v in cfg.flat().items()}
    defaults, profile = ExperimentConfig().flat(), make_config(cfg.profile).flat()
    notes, choices = key_notes(), key_choices()
    width = min(max(len(key) + len(value) for key, value in values.items()) + 1, 44)
    for key, value in values.items():
        origin = "--set" if key in overrides else "profile" if profile[key] != defaults[key] else ""
        note = notes[key] + (f" (one of: {', '.join(choices[key])})" if key in choices else "")
        print(f"{key}={value}".ljust(width), origin.ljust(7), f"# {note}")
    run_dir = default_run_dir(cfg)
    record = load_record(run_dir) if (run_dir / RECORD_NAME).is_file() else None
    done = len(record["rounds"]) if record else 0
    if record is None:
        state = "not run yet"
    elif record["status"] == "complete":
        state = f"finished ({done} rounds, top-1 {100 * record['final']['top1']:.1f}%): `run` reuses it"
    else:
        state = f"{done} of {cfg.fl.rounds} rounds done: `run` resumes it (unless it is running now)"
    print(f"run directory: {run_dir} ({state})")
    print(json.dumps({"profile": cfg.profile, "method": cfg.method.name, "fingerprint": cfg.fingerprint(),
                      "run_dir": str(run_dir), "status": record["status"] if record else None, "rounds_done": done,
                      "overrides": sorted(overrides), "config": cfg.flat()}))
    return 0


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    """``"data.alpha=0.1,0.5"`` -> ``("data.alpha", ["0.1", "0.5"])`` (typed and checked with the config)."""
    if text is None:
        return None
    key, _, values = text.partition("=")
    values = list(dict.fromkeys(v.strip() for v in values.split(",") if v.strip()))
    if not key.strip() or not values:
        raise ValueError(f"--sweep {text!r} is not of the form KEY=V1,V2,..., e.g. --sweep data.alpha=0.1,0.5,1.0")
    if key.strip() in ("seed", "method.name"):
        raise ValueError(f"--sweep cannot vary {key.strip()}: compare varies it already, use --seeds or --methods")
    return key.strip(), values


def compare_command(profile: str, methods: list[str], seeds: list[int] | None, overrides: dict,
                    sweep: tuple[str, list[str]] | None, markdown: bool, progress: bool) -> int:
    from fl_core import report
    from fl_core.config import profile_seeds
    from fl_core.experiment import run_grids

    seeds = seeds or profile_seeds(profile)
    key, values = sweep or (None, [None])
    variants = {m: {"method.name": m} for m in methods}
    # one grid per swept value, all handed to the workers at once; run_grids builds, hence
    # validates, every config before the first run starts
    grids = run_grids(profile, {v: (variants, seeds, {} if key is None else {key: v}) for v in values},
                      base=overrides, progress=progress)
    grids = {v: report.label_methods(records) for v, records in grids.items()}
    if key is None:
        table = report.results_table(grids[None])
    else:
        table = report.sweep_table({f"{key}={v}": grids[v] for v in values})
        if markdown:
            table.columns = [" ".join(column) for column in table.columns]
    print(table.to_markdown() if markdown else table.to_string())
    everything = [r for records in grids.values() for r in records]
    data = everything[0]["config"]["data"]
    print(report.GROUP_NOTE.format(many=data["many_threshold"], few=data["few_threshold"]))
    print(report.provenance_of(everything))
    summary = {"profile": profile, "seeds": seeds}
    if key is None:
        summary["results"] = _results_summary(grids[None])
    else:
        summary.update(sweep={"key": key, "values": values}, results={v: _results_summary(grids[v]) for v in values})
    print(json.dumps(summary))
    return 0


def _results_summary(records: list[dict]) -> dict:
    """{variant: method, seeds, each accuracy's mean and std (%), run record paths}."""
    from fl_core import report

    summary = {}
    for variant, stats in report.results_stats(records).items():
        runs = [r for r in records if r["_variant"] == variant]
        summary[variant] = {
            "method": runs[0]["method"]["name"], "seeds": stats["seeds"],
            **{name: value for k in report.ACCURACIES
               for name, value in zip((k.replace(" ", "_"), f"{k.replace(' ', '_')}_std"), stats[k])},
            "run_records": [r["_path"] for r in runs]}
    return summary


def annotate_command(cfg, progress: bool) -> int:
    from fl_core.experiment import annotate

    first = annotate(cfg, progress)
    second = annotate(cfg, progress=False)
    simulated = first["mllm"]["backend"] == "simulated"
    who = f"simulated MLLM (configured accuracy {cfg.teacher.mllm_accuracy:g})" if simulated else first["mllm"]["model"]
    encoder = ("offline encoder (EfficientNet-Lite0 + MiniLM, not CLIP)" if cfg.teacher.clip == "offline"
               else first["encoder"])
    print(f"pool: {first['pool']['images']} images from {first['pool']['source']}"
          + (f", {first['pool']['skipped']} unreadable skipped" if first["pool"]["skipped"] else ""))
    if first["annotation_accuracy"] is not None:
        print(f"annotation accuracy of the {who}: {100 * first['annotation_accuracy']:.2f}% (measured on the hidden labels)")
    print(f"zero-shot top-1 of the {encoder} on the {cfg.data.dataset} test set: {100 * first['zero_shot_top1']:.2f}%")
    print("sample captions" + (" (simulated MLLM)" if simulated else "") + ":")
    for sample in first["sample_captions"]:
        truth = f" [true: {sample['true_label']}]" if "true_label" in sample else ""
        print(f"  {sample['caption']!r} -> {sample['mllm_label']}{truth}")
    print(f"first run: {first['seconds']:.1f} s ({'cached' if first['cached'] else 'model work: ' + str(first['cache']['computed']) + ' outputs computed'}); "
          f"second run: {second['seconds']:.2f} s ({'cached' if second['cached'] else 'not cached'}); "
          f"speed-up {first['seconds'] / second['seconds']:.0f}x")
    summary = {k: first[k] for k in ("annotation_accuracy", "zero_shot_top1", "seconds", "cached")}
    summary.update({"second_seconds": second["seconds"], "second_cached": second["cached"], "simulated_mllm": simulated,
                    "encoder": first["encoder"], "pool_images": first["pool"]["images"], "cache": first["cache"]["path"]})
    print(json.dumps(summary))
    return 0
