"""Builds the C++ self-test binaries for the tests, once per source content (cached in the user cache)."""

import hashlib
import os
import subprocess

from n2uq_tf import _native

# AddressSanitizer + UBSan, failing on the first report.
SANITIZER_FLAGS = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer", "-pthread", "-ffp-contract=off"]
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


def cached_binary(tag, command, sources, headers=(), link_flags=()):
    """Compiles ``command + sources + link_flags`` unless a binary of the same inputs exists; returns its path."""
    digest = hashlib.sha256(" ".join(list(command) + list(link_flags)).encode())
    for path in list(sources) + list(headers):
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = _native.library_dirs()[-1]
    os.makedirs(cache, exist_ok=True)
    binary = os.path.join(cache, f"{tag}_{digest.hexdigest()[:12]}")
    if not os.path.exists(binary):
        tmp = binary + f".tmp{os.getpid()}"
        result = subprocess.run(list(command) + list(sources) + list(link_flags) + ["-o", tmp],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        os.replace(tmp, binary)
        prune_older_builds(cache, tag, binary)
    return binary


def prune_older_builds(cache, tag, keep):
    """Removes the binaries of `tag` built from older sources (``{tag}_{12 hex digits}``; another
    process's unfinished ``.tmp`` file and other tags are left alone), so the cache holds one
    binary per tag, as the library builds do."""
    stem = f"{tag}_"
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        rest = name[len(stem):]
        if name.startswith(stem) and len(rest) == 12 and set(rest) <= set("0123456789abcdef") and path != keep:
            try:
                os.unlink(path)
            except OSError:
                pass
