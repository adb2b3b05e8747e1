"""The delegate under a mutation campaign (tests/delegate_fuzz.py), ASan + UBSan, in child processes.

The suite runs a fixed-seed sample (N2UQ_FUZZ_CASES random mutants, default 400, seed
N2UQ_FUZZ_SEED = 0, ai_edge_litert); `make fuzz` runs the same test with a larger sample in
both interpreters (FUZZ_CASES, FUZZ_SEED). Pass: no crash with a frame in our code, every
option edit and op-I/O edit answered by our kernels (our error message, or a run for the
harmless ones), and the campaign reaches our code (valid mutants run, invalid ones get our
errors).

The builtin CONV_2D nodes the delegate claims (int8_conv / float_conv = all), and the PAD before
one, get their own campaign: a tiny float32 and int8 stem, every targeted edit of what the claims
read (conv options, quantization vectors, filter and bias buffers, paddings, shapes, types, tensor
lists) and N2UQ_FUZZ_CASES / 8 random mutants. Pass: no crash with a frame in our code; the
unmutated and resized models run with every conv and the PAD claimed, and a claimed conv or PAD
with a constant output gets our error.
"""

import os

import numpy as np
import pytest

import delegate_fuzz

CASES = int(os.environ.get("N2UQ_FUZZ_CASES", "400"))
SEED = int(os.environ.get("N2UQ_FUZZ_SEED", "0"))
BACKENDS = os.environ.get("N2UQ_FUZZ_BACKENDS", "litert").split(",")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def test_crash_classifier_places_the_stack():
    plugin = "/cache/n2uq_delegate_asan_0123"
    ours = """==1==ERROR: AddressSanitizer: heap-use-after-free on address 0x603 at pc 0x7f bp 0x7f sp 0x7f
READ of size 4 at 0x6030000a10e0 thread T0
    #0 0x7fe526d6f33d in DimsString /src/tflite_tools/tflite/delegate.cc:290
    #1 0x7fe526d7a10c in Resize /src/tflite_tools/tflite/delegate.cc:376
    #2 0x7fe5265c0000 in tflite::Subgraph::PrepareOpsStartingAt(int) (/site-packages/ai_edge_litert/libpywrap_litert_common.so+0x1)
SUMMARY: AddressSanitizer: heap-use-after-free /src/tflite_tools/tflite/delegate.cc:290 in DimsString"""  # noqa: E501
    stock = """AddressSanitizer:DEADLYSIGNAL
==2==ERROR: AddressSanitizer: SEGV on unknown address 0x000000000010 (pc 0x7f bp 0x7f sp 0x7f T0)
    #0 0x7f0 in tflite::InterpreterBuilder::ParseTensors (/site-packages/ai_edge_litert/libpywrap_litert_common.so+0x2)
    #1 0x7f1 in tflite::InterpreterBuilder::operator() (/site-packages/ai_edge_litert/libpywrap_litert_common.so+0x3)
SUMMARY: AddressSanitizer: SEGV (/site-packages/ai_edge_litert/libpywrap_litert_common.so+0x2)"""
    in_plugin = stock.replace("#1 0x7f1 in tflite::InterpreterBuilder::operator() (/site-packages/ai_edge_litert/"
                              "libpywrap_litert_common.so+0x3)", f"#1 0x7f1 ({plugin}+0x1c2)")
    ubsan = "/src/tflite_tools/core/core.cc:12:5: runtime error: signed integer overflow\n    #0 0x1 in f core.cc:12"
    assert delegate_fuzz.classify_crash(ours, plugin) == (
        "ours", "SUMMARY: AddressSanitizer: heap-use-after-free /src/tflite_tools/tflite/delegate.cc:290 in DimsString")
    assert delegate_fuzz.classify_crash(stock, plugin)[0] == "stock"
    assert delegate_fuzz.classify_crash(in_plugin, plugin)[0] == "ours"
    assert delegate_fuzz.classify_crash(ubsan, plugin)[0] == "ours"
    assert delegate_fuzz.classify_crash("Segmentation fault", plugin)[0] == "ours"  # no stack: not cleared


@pytest.fixture(scope="module")
def campaign():
    base = delegate_fuzz.base_model()
    return delegate_fuzz.campaign(base, CASES, SEED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutants_never_crash_in_our_code(campaign, backend, tmp_path):
    plugin, env = delegate_fuzz.asan_plugin(), delegate_fuzz.sanitizer_env()
    results = delegate_fuzz.run_mutants(campaign, backend, plugin, env, str(tmp_path))
    counts, table = delegate_fuzz.tally(results)
    print(f"\n{backend}: {len(campaign)} mutants, seed {SEED}\n{table}")
    failures = []
    for mutant, outcome, detail in results:
        if outcome == "crash-ours":
            failures.append(f"[{mutant.cls}] {mutant.label}: crash in our code\n{detail[-4000:]}")
        elif mutant.cls == "op_io_edit" and not (outcome == "error" and delegate_fuzz.is_our_error(detail)):
            failures.append(f"[{mutant.cls}] {mutant.label}: {outcome} without our error: {detail[:500]}")
        elif mutant.cls in ("option_edit", "resize") and outcome == "error" and not delegate_fuzz.is_our_error(detail):
            # the runtime reads neither our options nor, for a plain resize, anything it could refuse
            failures.append(f"[{mutant.cls}] {mutant.label}: an error not from our kernels: {detail[:500]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures[:10])
    assert set(counts) == set(delegate_fuzz.CLASSES)
    # The campaign reaches the kernels: valid mutants run, invalid ones meet our checks.
    assert counts["bitflip_weights"]["ran"] == sum(counts["bitflip_weights"].values()) > 0
    assert counts["resize"]["ran"] > 0
    assert counts["option_edit"]["ran"] > 0 and counts["option_edit"]["error (ours)"] > 0
    for cls in ("bitflip_options", "shape_edit", "type_edit"):
        assert counts[cls]["error (ours)"] > 0, cls


# ------------------------------------------------------------------ builtin CONV_2D nodes

@pytest.fixture(scope="module")
def conv_models():
    return delegate_fuzz.builtin_conv_models()


def test_builtin_conv_models_are_claimed(conv_models):
    """The campaign's base models reach the delegate's builtin kernels: with the campaign's options
    the three CONV_2D nodes and the PAD of each model are claimed and run."""
    from ai_edge_litert.interpreter import Interpreter
    from n2uq_tf.tflite import delegate as n2d

    for kind, content in conv_models.items():
        plugin = n2d.load_delegate("litert", **delegate_fuzz.BUILTIN_CONV_OPTIONS)
        interpreter = Interpreter(model_content=content, experimental_delegates=[plugin])
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        x = np.random.default_rng(0).normal(size=detail["shape"]).astype(np.float32)
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        entries = n2d.kernel_profile(plugin)
        assert sorted(e["op"] for e in entries) == [f"CONV_2D ({kind})"] * 3 + ["PAD"], (kind, entries)
        assert all(e["invocations"] == 1 for e in entries), (kind, entries)
        del interpreter


@pytest.mark.parametrize("backend", BACKENDS)
def test_builtin_conv_mutants_never_crash_in_our_code(conv_models, backend, tmp_path):
    mutants = delegate_fuzz.builtin_conv_campaign(conv_models, max(CASES // 8, 1), SEED)
    plugin, env = delegate_fuzz.asan_plugin(), delegate_fuzz.sanitizer_env()
    results = delegate_fuzz.run_mutants(mutants, backend, plugin, env, str(tmp_path),
                                        options=delegate_fuzz.BUILTIN_CONV_OPTIONS)
    counts, table = delegate_fuzz.tally(results)
    print(f"\n{backend}: {len(mutants)} builtin conv mutants, seed {SEED}\n{table}")
    failures = [f"[{m.cls}] {m.label}: crash in our code\n{detail[-4000:]}" for m, outcome, detail in results
                if outcome == "crash-ours"]
    failures += [f"[{m.cls}] {m.label}: {outcome} {detail[:500]}" for m, outcome, detail in results
                 if m.label.endswith(("unmutated", "input resized")) and outcome != "ran"]
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures[:10])
    assert set(counts) == set(delegate_fuzz.BUILTIN_CONV_CLASSES)
    # The campaign reaches the kernels: valid edits run, a claimed node's constant output gets our error.
    assert counts["conv_options"]["ran"] > 0 and counts["conv_random"]["ran"] > 0 and counts["pad"]["ran"] > 0
    assert counts["conv_io"]["error (ours)"] > 0 and counts["pad"]["error (ours)"] > 0
