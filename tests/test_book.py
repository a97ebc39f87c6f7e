"""The book shows every notebook; every notebook runs on the smoke profile by default (what nbval
executes and `make book` overrides); and what nbval compares holds in any checkout."""

import re
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def toc_files(entry) -> list[str]:
    if isinstance(entry, dict):
        return ([entry["file"]] if "file" in entry else []) + [f for value in entry.values() for f in toc_files(value)]
    if isinstance(entry, list):
        return [f for item in entry for f in toc_files(item)]
    return []


def test_the_table_of_contents_lists_every_notebook_once():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    chapters = [toc["root"], *toc_files(toc["parts"])]
    assert sorted(chapters) == sorted(nb.stem for nb in NOTEBOOKS)
    assert len(chapters) == len(set(chapters))


def test_every_notebook_has_a_parameters_cell_defaulting_to_the_smoke_profile():
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{path.name}: one cell tagged 'parameters' expected, found {len(cells)}"
        assert 'profile = "smoke"' in cells[0].source, path.name


def test_compared_outputs_name_no_path_of_the_machine_that_stored_them():
    """A warning's file path (``/home/me/repo/fl_core/...``) differs in every checkout, so nbval
    would fail everywhere but where the outputs were stored; such cells are tagged nbval-ignore-output."""
    absolute_path = re.compile(r"/\S*/fl_core/\S*\.py")
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code" or "nbval-ignore-output" in cell.metadata.get("tags", []):
                continue
            for output in cell.get("outputs", []):
                text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
                assert not absolute_path.search(text), f"{path.name}: {absolute_path.search(text).group()}"
