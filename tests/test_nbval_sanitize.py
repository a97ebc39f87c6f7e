import importlib.util
import json
import re
from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

SCRIPT = Path(__file__).resolve().parents[1] / "notebooks" / "nbval_sanitize.py"
OUTPUT = "<td>19.3</td>\n|19.3|n/a|\nhead classes 48.2% vs tail classes 0.0% top-1\n|  3|  seeds"


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("nbval_sanitize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sanitized(rules: str, text: str) -> str:
    for regex, replace in get_sanitize_patterns(rules):  # what nbval does with each output
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize("machine, compared", [
    ({"cpu_vendor": "AuthenticAMD", "cpu_capability": "AVX512", "torch": "2.14.1"}, True),
    ({"cpu_vendor": "GenuineIntel", "cpu_capability": "AVX512", "torch": "2.14.1"}, False),
    ({"cpu_vendor": "AuthenticAMD", "cpu_capability": "AVX2", "torch": "2.14.1"}, False),
    ({"cpu_vendor": "AuthenticAMD", "cpu_capability": "AVX512", "torch": "2.15.0"}, False),
])
def test_accuracies_are_compared_only_where_the_machine_rounds_as_the_stored_one(script, tmp_path, monkeypatch,
                                                                                 capsys, machine, compared):
    stored = tmp_path / "stored-on.json"
    stored.write_text(json.dumps({"cpu_vendor": "AuthenticAMD", "cpu_capability": "AVX512", "torch": "2.14.1"}))
    monkeypatch.setattr(script, "STORED_ON", stored)
    monkeypatch.setattr(script, "numerics", lambda: machine)
    monkeypatch.setattr(script, "libraries_off_their_pins", lambda: [])
    assert script.main([]) == 0
    out, err = capsys.readouterr()
    text = sanitized(out, OUTPUT)
    assert ("19.3" in text and "48.2%" in text) == compared
    assert ("#.#" in text) != compared
    assert "|  seeds" not in text  # the column padding rule applies either way
    assert ("accuracies compared" if compared else "accuracies masked") in err


def test_libraries_at_other_versions_than_pinned_mask_the_accuracies(script, tmp_path, monkeypatch, capsys):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# pins\nnumpy==2.4.6\ntorch==2.14.1\nSentence_Transformers==6.3.0\n")
    monkeypatch.setattr(script, "CONSTRAINTS", constraints)
    monkeypatch.setattr("fl_core.results.library_versions", lambda: {
        "python": "3.11.7", "torch": "2.14.1+cu130", "numpy": "2.3.0", "sentence-transformers": "6.3.0", "timm": "1.0"})
    assert script.libraries_off_their_pins() == ["numpy 2.3.0 (pinned 2.4.6)"]  # torch's build tag aside
    monkeypatch.setattr(script, "numerics", script.stored_numerics)  # the machine that stored them
    script.main([])
    out, err = capsys.readouterr()
    assert "19.3" not in sanitized(out, OUTPUT)
    assert "accuracies masked" in err and "but here numpy 2.3.0 (pinned 2.4.6)" in err


def test_without_a_record_of_the_storing_machine_accuracies_are_masked(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "STORED_ON", tmp_path / "missing.json")
    script.main([])
    assert "19.3" not in sanitized(capsys.readouterr().out, OUTPUT)


def test_store_records_this_machine(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "STORED_ON", tmp_path / "stored-on.json")
    assert script.main(["--store"]) == 0
    assert script.stored_numerics() == script.numerics()
    assert all(script.numerics().values())


def test_the_stored_outputs_name_the_machine_they_came_from(script):
    assert set(script.stored_numerics()) == {"cpu_vendor", "cpu_capability", "torch"}
