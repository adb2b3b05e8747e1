"""Builds the package's C++ libraries once: the fused training kernel, the kernel core, the delegate.

One routine for all three: the library's file name carries a hash of its sources, flags and
compiler, so an edited source is rebuilt; it is compiled into a temporary file and renamed into
place (concurrent builders never see a partial library); it goes into the package folder, or
into $XDG_CACHE_HOME/n2uq_tf when that is read-only; older builds of the same library are
removed. No -march flag anywhere: the SIMD paths carry their own target options and are picked
at run time.

Only the standard library is imported, so setup.py can load this file to build the TFLite-side
libraries at install time (the fused kernel needs TensorFlow's flags and is built on first use).
"""

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# "n2uq_tf._native" in the package: the n2uq-tf command shows its INFO messages on stderr.
logger = logging.getLogger(__name__)

# The bit-serial kernel core (tflite_tools/core) and the TFLite delegate plugin (tflite_tools/tflite).
CORE_HEADERS_AND_SOURCES = ("n2uq_core.h", "kernel_table.h", "kernels_impl.h", "dot_impl.h", "core.cc",
                            "isa_portable.cc", "isa_avx2.cc", "isa_avx2_dot.cc", "isa_avx512.cc", "isa_avx512_dot.cc",
                            "isa_amx.cc", "isa_neon.cc", "core_internal.h", "output_stage_impl.h", "output_stage.cc",
                            "vector_x86.cc", "pool_impl.h", "pool.cc", "int8_conv.cc",
                            "isa_avx512_int8.cc", "float_conv.cc", "isa_avx512_float.cc", "quantize_avx512_impl.h")
CORE_COMPILED = ("core.cc", "isa_portable.cc", "isa_avx2.cc", "isa_avx2_dot.cc", "isa_avx512.cc", "isa_avx512_dot.cc",
                 "isa_amx.cc", "isa_neon.cc", "output_stage.cc", "vector_x86.cc", "pool.cc",
                 "int8_conv.cc", "isa_avx512_int8.cc", "float_conv.cc", "isa_avx512_float.cc")
CORE_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
DELEGATE_HEADERS_AND_SOURCES = ("tflite_abi.h", "flexbuffer_options.h", "flexbuffer_options.cc", "delegate.cc")
DELEGATE_COMPILED = ("delegate.cc", "flexbuffer_options.cc")
DELEGATE_FLAGS = CORE_FLAGS + ["-fvisibility=hidden"]


class BuildError(RuntimeError):
    """A library could not be compiled (no compiler, a compile error, no writable folder)."""


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"


def library_dirs():
    """Where libraries go: the package's _lib folder, else the user cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(PACKAGE_DIR, "_lib"), os.path.join(cache, "n2uq_tf")]


def content_name(prefix, flags, files):
    """``{prefix}{hash}.so`` over the flags, the compiler and every (file name, content)."""
    digest = hashlib.sha256(" ".join(list(flags) + [compiler()]).encode())
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return f"{prefix}{digest.hexdigest()[:12]}.so"


def build_library(name, command, description, *, stale_prefix, force=False, verbose=True, directories=None,
                  error=BuildError):
    """Compiles a library with ``command(output_path)`` unless `name` exists; returns its path.

    Raises `error` (a RuntimeError subclass) with the compiler's message on failure.
    """
    directories = directories or library_dirs()
    if not force:
        for directory in directories:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    problems = []
    for directory in directories:
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError as problem:
            problems.append(f"{directory}: {problem}")
            continue
        if verbose:
            logger.info("n2uq_tf: building %s (once) into %s", description, directory)
        try:
            result = subprocess.run(command(tmp), capture_output=True, text=True)
        except OSError as problem:
            os.unlink(tmp)
            raise error(f"cannot run the C++ compiler {compiler()!r}: {problem}") from problem
        if result.returncode != 0:
            os.unlink(tmp)
            raise error(f"compiling {description} failed:\n{result.stderr[-3000:]}")
        path = os.path.join(directory, name)
        os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
        for old in os.listdir(directory):  # builds of older sources
            if old.startswith(stale_prefix) and old.endswith(".so") and old != name:
                try:
                    os.unlink(os.path.join(directory, old))
                except OSError:
                    pass
        return path
    raise error(f"no writable folder for {description}: " + "; ".join(problems))


def _find_sources(env_var, packaged, checkout, marker, what):
    for candidate in (os.environ.get(env_var), os.path.join(PACKAGE_DIR, *packaged),
                      os.path.join(os.path.dirname(PACKAGE_DIR), *checkout)):
        if candidate and os.path.exists(os.path.join(candidate, marker)):
            return candidate
    raise BuildError(f"cannot find the {what} sources ({'/'.join(checkout)}); set {env_var}")


def core_source_dir():
    """The kernel core's C++ sources: in the wheel (n2uq_tf/tflite/csrc) or the checkout."""
    return _find_sources("N2UQ_CORE_SOURCE_DIR", ("tflite", "csrc"), ("tflite_tools", "core"), "n2uq_core.h",
                         "kernel core")


def delegate_source_dir():
    """The delegate plugin's C++ sources: in the wheel (n2uq_tf/tflite/csrc/tflite) or the checkout."""
    return _find_sources("N2UQ_DELEGATE_SOURCE_DIR", ("tflite", "csrc", "tflite"), ("tflite_tools", "tflite"),
                         "delegate.cc", "delegate plugin")


def core_build_command(output, sources=None):
    sources = sources or core_source_dir()
    return [compiler()] + CORE_FLAGS + [os.path.join(sources, n) for n in CORE_COMPILED] + ["-o", output]


def delegate_build_command(output, sources=None, core_sources=None):
    sources, core_sources = sources or delegate_source_dir(), core_sources or core_source_dir()
    return ([compiler()] + DELEGATE_FLAGS + ["-I" + core_sources, "-I" + sources]
            + [os.path.join(sources, n) for n in DELEGATE_COMPILED]
            + [os.path.join(core_sources, n) for n in CORE_COMPILED] + ["-o", output])


def build_core(force=False, verbose=True, error=BuildError, directories=None):
    """The bit-serial kernel core library (ctypes API n2uq_core.h); returns its path."""
    sources = core_source_dir()
    name = content_name("n2uq_core_", CORE_FLAGS, [os.path.join(sources, n) for n in CORE_HEADERS_AND_SOURCES])
    return build_library(name, lambda out: core_build_command(out, sources), "the bit-serial kernel core",
                         stale_prefix="n2uq_core_", force=force, verbose=verbose, error=error,
                         directories=directories)


def build_delegate(force=False, verbose=True, error=BuildError, directories=None):
    """The TFLite delegate plugin (kernels + core linked in, no TFLite symbols); returns its path."""
    sources, core_sources = delegate_source_dir(), core_source_dir()
    files = ([os.path.join(sources, n) for n in DELEGATE_HEADERS_AND_SOURCES]
             + [os.path.join(core_sources, n) for n in CORE_HEADERS_AND_SOURCES])
    name = content_name("n2uq_delegate_", DELEGATE_FLAGS, files)
    return build_library(name, lambda out: delegate_build_command(out, sources, core_sources),
                         "the TFLite delegate plugin", stale_prefix="n2uq_delegate_", force=force,
                         verbose=verbose, error=error, directories=directories)
