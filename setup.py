"""Packaging lives in setup.cfg; this file only ships the C++ sources of tflite_tools with the package."""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

# C++ sources compiled on first use: repository folder -> folder inside the installed package.
NATIVE_SOURCES = {
    os.path.join("tflite_tools", "core"): os.path.join("n2uq_tf", "tflite", "csrc"),              # kernel core
    os.path.join("tflite_tools", "tflite"): os.path.join("n2uq_tf", "tflite", "csrc", "tflite"),  # delegate
}


class BuildPyWithNativeSources(build_py):
    """Ships tflite_tools' C++ sources inside the package (an editable install reads the repository)."""

    def run(self):
        super().run()
        for source, target in NATIVE_SOURCES.items():
            target = os.path.join(self.build_lib, target)
            os.makedirs(target, exist_ok=True)
            for path in glob.glob(os.path.join(source, "*.h")) + glob.glob(os.path.join(source, "*.cc")):
                shutil.copy(path, target)


setup(cmdclass={"build_py": BuildPyWithNativeSources})
