"""Packaging lives in setup.cfg; this file only ships the C++ kernel core with the package."""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

CORE_SOURCES = os.path.join("tflite_tools", "core")


class BuildPyWithKernelCore(build_py):
    """Copies tflite_tools/core (the bit-serial kernels, built on first use) to n2uq_tf/tflite/csrc.

    An editable install finds the sources in the repository instead (n2uq_tf.tflite._core.source_dir).
    """

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "n2uq_tf", "tflite", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in glob.glob(os.path.join(CORE_SOURCES, "*.h")) + glob.glob(os.path.join(CORE_SOURCES, "*.cc")):
            shutil.copy(path, target)


setup(cmdclass={"build_py": BuildPyWithKernelCore})
