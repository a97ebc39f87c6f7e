"""The book shows every notebook; every notebook runs on the smoke profile by default (what nbval
executes and `make book` overrides) and to its end on the paper profiles' code path; and what nbval
compares holds in any checkout."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
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


@pytest.mark.slow
def test_every_notebook_runs_to_its_end_on_the_paper_profiles_code_path(tmp_path, monkeypatch):
    """`make book PROFILE=paper-cifar10` at toy scale: the profile's real teachers (a tiny random
    LLaVA through transformers, a tiny random open_clip model, both from local files), images of
    your own in place of CIFAR (whose loading tests/test_paper_setting.py covers), two rounds, one
    seed. What a GPU user would otherwise find out after hours of runs: a page that assumes the
    simulated MLLM or the offline encoder."""
    import papermill
    from PIL import Image

    from tiny_teachers import save_tiny_llava, save_tiny_open_clip

    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))  # the kernels inherit the environment
    rng = np.random.RandomState(0)
    for split, counts in (("train", (40, 30, 20, 12, 8, 5)), ("test", (4,) * 6)):
        for c, n in enumerate(counts):
            folder = tmp_path / "images" / split / f"thing{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.rand(36, 36, 3) * 60 + 30 * c).astype(np.uint8)).save(folder / f"{i}.png")
    clip_config, clip_weights = save_tiny_open_clip(tmp_path / "clip")
    overrides = {"data.dataset": "imagefolder", "data.root": str(tmp_path / "images"), "data.imbalance_factor": 2.0,
                 "teacher.mllm_model": str(save_tiny_llava(tmp_path / "llava")), "teacher.clip_model": str(clip_config),
                 "teacher.clip_pretrained": str(clip_weights), "teacher.batch_size": 8, "device": "cpu",
                 "cpu_threads": 1, "fl.rounds": 2, "data.num_clients": 4, "fl.clients_per_round": 2,
                 "model.width": 0.125, "method.stage1_epochs": 1, "method.align_per_class": 2,
                 "method.creff_num_features": 5, "method.creff_match_steps": 3, "method.creff_retrain_epochs": 2}
    for path in NOTEBOOKS:
        parameters = {"profile": "paper-cifar10", "overrides": overrides}
        source = next(c.source for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        parameters.update({name: [7] for name in ("seeds", "sweep_seeds") if re.search(rf"^{name} =", source, re.M)})
        executed = papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=parameters,
                                              progress_bar=False, kernel_name="python3")
        assert executed.metadata.papermill.exception is not True, path.name


def test_the_libraries_that_load_teachers_do_not_warn_about_ipywidgets_in_a_notebook():
    """timm, open_clip and transformers import tqdm.auto, which in a Jupyter kernel without ipywidgets
    warns into whichever cell first loads one; with warm caches that is a compared cell (stage 1's
    zero-shot table). Importing fl_core first takes that warning out."""
    script = """
import importlib, sys, types, warnings
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # what tqdm takes for a kernel
import IPython
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in sys.argv[1:]:
        importlib.import_module(name)
print(sum("IProgress not found" in str(w.message) for w in caught))
"""
    def warnings_importing(*modules):
        out = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    if importlib.util.find_spec("ipywidgets") is None:
        assert warnings_importing("timm") == 1  # the case this guards against
    assert warnings_importing("fl_core", "timm") == 0
