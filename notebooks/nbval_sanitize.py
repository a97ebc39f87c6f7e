"""The sanitize rules nbval uses (``make test``): the stored outputs' accuracies are compared only on
a machine that rounds as the one that stored them.

Accuracies of trained models repeat exactly on one machine and on CPUs that run the same code paths
of torch's libraries (two AMD EPYCs of different generations did), but not across CPU vendors (an
Intel Xeon rounded differently). So the stored outputs name what decides that, the CPU vendor,
torch's vector instruction set and torch's version (``stored-on.json``, written by ``make
notebooks``); where this machine matches, and the libraries that compute are at the versions
``constraints.txt`` pins (those ``make setup`` installs, with which the outputs were stored), the
``[accuracies ...]`` sections of ``nbval-sanitize.cfg`` are dropped and nbval compares every number.

    python notebooks/nbval_sanitize.py > rules.cfg   # the rules for this machine; says which on stderr
    python notebooks/nbval_sanitize.py --store        # the outputs were just stored on this machine
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "nbval-sanitize.cfg"
STORED_ON = HERE / "stored-on.json"
CONSTRAINTS = HERE.parent / "constraints.txt"
ACCURACY_SECTION = re.compile(r"^\[accuracies[^\]]*\]\n(?:(?!\[).*\n?)*", re.MULTILINE)


def numerics() -> dict[str, str]:
    """What decides how this machine rounds the smoke runs."""
    import torch

    from fl_core.results import cpu_vendor

    return {"cpu_vendor": cpu_vendor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def stored_numerics() -> dict[str, str] | None:
    return json.loads(STORED_ON.read_text()) if STORED_ON.exists() else None


def pinned_versions() -> dict[str, str]:
    """constraints.txt's pins, ``{canonical name: version}`` (none where there is no such file)."""
    from packaging.utils import canonicalize_name

    lines = CONSTRAINTS.read_text().splitlines() if CONSTRAINTS.exists() else []
    return {canonicalize_name(name): version for name, _, version in
            (line.partition("==") for line in lines if "==" in line and not line.startswith("#"))}


def libraries_off_their_pins() -> list[str]:
    """The libraries that compute (``fl_core.results.library_versions``) installed at another version
    than constraints.txt pins, e.g. ``numpy 2.3.0 (pinned 2.4.6)``."""
    from packaging.utils import canonicalize_name

    from fl_core.results import library_versions

    pins = pinned_versions()
    off = []
    for name, version in library_versions().items():
        pin = pins.get(canonicalize_name(name))
        if pin is not None and version.split("+")[0] != pin:  # torch's build tag aside
            off.append(f"{name} {version} (pinned {pin})")
    return off


def rules(compare_accuracies: bool) -> str:
    """``nbval-sanitize.cfg``, without its accuracy masks where ``compare_accuracies``."""
    text = RULES.read_text()
    return ACCURACY_SECTION.sub("", text) if compare_accuracies else text


def main(argv: list[str]) -> int:
    here = numerics()
    if argv == ["--store"]:
        STORED_ON.write_text(json.dumps(here, indent=1) + "\n")
        return 0
    if argv:
        print(f"usage: {Path(__file__).name} [--store]", file=sys.stderr)
        return 2
    stored = stored_numerics()
    same = stored == here
    off_pins = libraries_off_their_pins() if same else []
    compare = same and not off_pins
    if off_pins:
        why = (f"the outputs were stored with constraints.txt's versions (make setup installs them), but here "
               f"{', '.join(off_pins)}")
    else:
        why = (f"this machine ({', '.join(here.values())}) {'rounds as' if same else 'may round otherwise than'} "
               f"the one that stored the outputs ({', '.join(stored.values()) if stored else 'not recorded'})")
    print(f"nbval: accuracies {'compared' if compare else 'masked'}: {why}", file=sys.stderr)
    sys.stdout.write(rules(compare))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # fl_core from this checkout
    raise SystemExit(main(sys.argv[1:]))
