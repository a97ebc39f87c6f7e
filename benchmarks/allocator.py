"""What keeping freed memory (``fl_core.allocator``, ``FL_CORE_MALLOC``) is worth: one training step
of ResNet-8 (``stacked_conv.py``'s grouped step; 1 client is one plain model, as the sequential
engine trains it, 8 are the round's clients trained together) timed in two child processes, one
with glibc's default ``malloc`` and one with freed memory kept. The allocator is set when a process
starts, hence the children. Prints milliseconds and the speed-up; the last stdout line is a JSON
object.

    python benchmarks/allocator.py [--widths 0.125 1] [--clients 1 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STEP = Path(__file__).with_name("stacked_conv.py")


def step_seconds(malloc: str, width: float, clients: int, repeats: int, device: str) -> float:
    """Seconds per step of ``stacked_conv.py`` (grouped, channels-last on a CPU, fp32) in a child
    process run with ``FL_CORE_MALLOC=malloc``."""
    layout = "channels-last" if device == "cpu" else "contiguous"
    command = [sys.executable, str(STEP), "--device", device, "--width", str(width), "--clients", str(clients),
               "--repeats", str(repeats), "--strategies", "grouped", "--precisions", "fp32", "--layouts", layout]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "FL_CORE_MALLOC": malloc,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["malloc"] != malloc:
        raise RuntimeError(f"the child ran with malloc {summary['malloc']!r}, not {malloc!r} (not glibc?)")
    return next(iter(summary["seconds_per_step"].values()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="*", type=float, default=[0.125, 1.0])
    parser.add_argument("--clients", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'width':>6}{'clients':>8}{'default ms':>12}{'kept ms':>10}{'speed-up':>10}")
    for width in args.widths:
        for clients in args.clients:
            default, kept = (step_seconds(m, width, clients, args.repeats, args.device) for m in ("default", "keep"))
            results[f"width {width:g}, {clients} clients"] = {"default": default, "keep": kept, "ratio": default / kept}
            print(f"{width:>6g}{clients:>8}{default * 1e3:>12.2f}{kept * 1e3:>10.2f}{default / kept:>9.2f}x", flush=True)
    summary = {"device": args.device, "seconds_per_step": results,
               "ratio_keep_vs_default": {k: v["ratio"] for k, v in results.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
