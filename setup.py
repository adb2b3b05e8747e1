"""Packaging lives in setup.cfg; this file ships tflite_tools' C++ sources and builds them at install."""

import glob
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

# C++ sources compiled by n2uq_tf._native: repository folder -> folder inside the installed package.
NATIVE_SOURCES = {
    os.path.join("tflite_tools", "core"): os.path.join("n2uq_tf", "tflite", "csrc"),              # kernel core
    os.path.join("tflite_tools", "tflite"): os.path.join("n2uq_tf", "tflite", "csrc", "tflite"),  # delegate
}


def _native_builder():
    """n2uq_tf/_native.py loaded on its own (the package imports TensorFlow, the build does not)."""
    spec = importlib.util.spec_from_file_location("n2uq_tf_native", os.path.join("n2uq_tf", "_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithNativeSources(build_py):
    """Ships the C++ sources inside the package and builds the kernel core and the delegate plugin.

    A wheel gets the libraries in n2uq_tf/_lib; an editable install builds them into the
    checkout's n2uq_tf/_lib. Without a compiler the install still succeeds and the libraries
    are built on first use (with the same message then).
    """

    def run(self):
        super().run()
        for source, target in NATIVE_SOURCES.items():
            target = os.path.join(self.build_lib, target)
            os.makedirs(target, exist_ok=True)
            for path in glob.glob(os.path.join(source, "*.h")) + glob.glob(os.path.join(source, "*.cc")):
                shutil.copy(path, target)
        package = "n2uq_tf" if getattr(self, "editable_mode", False) else os.path.join(self.build_lib, "n2uq_tf")
        native = _native_builder()
        directories = [os.path.join(package, "_lib")]
        try:
            native.build_core(directories=directories)
            native.build_delegate(directories=directories)
        except native.BuildError as error:
            print(f"warning: n2uq_tf's C++ libraries were not built now ({error}); they are built on first use")


setup(cmdclass={"build_py": BuildPyWithNativeSources})
