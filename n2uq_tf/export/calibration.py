"""Lets TFLite's int8 calibrator (converter side) run the N2UQ custom ops.

TFLite's int8 calibrator runs the float model in its own interpreter, which takes custom ops
only from registerers (``converter.target_spec._experimental_custom_op_registerers``), not from
delegates. `op_resolver_registerer` adds the delegate plugin's kernels (`n2uq_tflite_registration`)
to the calibrator's MutableOpResolver through AddCustom, a symbol of the TensorFlow wheel's
libtensorflow_cc (the converter's own TFLite), resolved with ctypes: no link step, and the plugin
itself stays free of TensorFlow symbols. Development-time only; apps load the plugin as a delegate.
"""

import ctypes
import os

import tensorflow as tf

from n2uq_tf.export.custom_ops import ALL_OPS
from n2uq_tf.tflite.delegate import DelegateUnavailableError, library

# MutableOpResolver::AddCustom(const char*, const TfLiteRegistration*, int min_version, int max_version)
_ADD_CUSTOM_SYMBOL = "_ZN6tflite17MutableOpResolver9AddCustomEPKcPK18TfLiteRegistrationii"


def op_resolver_registerer():
    """A registerer for TFLite's converter-side interpreters: ``fn(resolver_address)`` adding the N2UQ ops.

    Raises DelegateUnavailableError when the plugin cannot be built or this TensorFlow does not
    expose AddCustom.
    """
    path = os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2")
    try:
        add_custom = ctypes.CDLL(path)[_ADD_CUSTOM_SYMBOL]
    except (OSError, AttributeError) as error:
        raise DelegateUnavailableError(
            f"this TensorFlow ({tf.__version__}) does not expose MutableOpResolver::AddCustom in {path}, "
            f"so its int8 calibrator cannot run the N2UQ ops: {error}") from error
    add_custom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    add_custom.restype = None
    lib = library()
    registrations = {name: lib.n2uq_tflite_registration(name.encode()) for name in ALL_OPS}
    missing = [name for name, registration in registrations.items() if not registration]
    if missing:
        raise DelegateUnavailableError(f"the delegate plugin has no registration for {', '.join(missing)}")

    def register(resolver_address):
        for name, registration in registrations.items():
            add_custom(resolver_address, name.encode(), registration, 1, 1)

    return register
