"""benchmarks/kernels.py's RESULTS.md bookkeeping: one section per CPU class (model name, family and
model number), a run replacing its own class's section and keeping the others."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sections(text):
    prefix = "<!-- cpu-class: "
    return [line[len(prefix):-len(" -->")] for line in text.splitlines() if line.startswith(prefix)]


def test_a_run_replaces_its_own_class_and_keeps_the_others(kernels, tmp_path):
    path = tmp_path / "RESULTS.md"
    xeon_a = "Intel(R) Xeon(R) Processor, family 6 model 207 (Emerald Rapids)"
    xeon_b = "Intel(R) Xeon(R) Processor, family 6 model 167"
    epyc = "AMD EPYC, family 26 model 2 (Zen 5)"
    kernels.write_cpu_section(str(path), epyc, ["## epyc", "first"])
    kernels.write_cpu_section(str(path), xeon_a, ["## xeon a", "first"])
    kernels.write_cpu_section(str(path), xeon_b, ["## xeon b", "first"])  # same model name, another class
    kernels.write_cpu_section(str(path), xeon_a, ["## xeon a", "second"])
    text = path.read_text()
    assert text.startswith(kernels.RESULTS_TITLE + "\n\n" + kernels.RESULTS_INTRO)
    assert sections(text) == [epyc, xeon_a, xeon_b]  # first-written order kept
    body = {name: text.split(f"<!-- cpu-class: {name} -->")[1].split("<!-- end cpu-class -->")[0] for name in
            sections(text)}
    assert "second" in body[xeon_a] and "first" not in body[xeon_a]
    assert "first" in body[xeon_b] and "first" in body[epyc]


def test_the_repository_results_are_keyed_by_class(kernels):
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    names = sections(text)
    assert names and len(names) == len(set(names))
    for name in names:
        assert " family " in name and " model " in name, name  # written by cpu_class()
        assert f"## {name} (" in text


def test_cpu_class_names_the_family_and_model(kernels):
    name, family = kernels.cpu_name(), kernels.cpu_family()
    assert kernels.cpu_class() == (f"{name}, {family}" if family else name)
    if pathlib.Path("/proc/cpuinfo").exists() and "family" in pathlib.Path("/proc/cpuinfo").read_text():
        assert family.startswith("family ")
