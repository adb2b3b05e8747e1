"""Wraps the TFLite-independent bit-serial kernel core (tflite_tools/core) with ctypes.

The library is built at install time or on first use by `n2uq_tf._native` (content-hashed
name, atomic rename, no -march flag: the AVX2/AVX-512 kernels are picked at run time).

Functions take NumPy arrays and return NumPy arrays; errors from the C API are raised as
`CoreError` (a ValueError) with the library's message. `isa` is "auto" (environment
variable N2UQ_KERNEL_ISA, else the fastest supported), "portable", "avx2", "avx512" or "neon".
Conv and fully connected layers also take `path`: "auto" (environment variable
N2UQ_KERNEL_PATH, else the fastest on the layer's shape, measured once per shape), "bitserial"
(AND + popcount), "dot" (integer dot products on byte codes), "lut" (table lookups) or "amx" (the
dot path's products on Intel AMX tiles, in its direct form for any conv and its 3x3 Winograd forms,
see `amx_status`); every path gives identical results. `ConvPlan` prepares a layer's weights once for repeated calls.
"""

import ctypes
import threading

import numpy as np

from n2uq_tf import _native

ISAS = ("auto", "portable", "avx2", "avx512", "neon")
PATHS = ("auto", "bitserial", "dot", "lut", "amx")
# A plan's form (n2uq_conv_plan_form): the dot and amx paths run 3x3 stride-1 convs in Winograd
# F(2x2, 3x3) form and 3x3 stride-2 convs in its polyphase variant unless the plan's timing chose
# their direct form (or N2UQ_DOT_WINOGRAD=0); every other plan is direct. "direct_compact": the amx
# path's direct form holding its weights as codes and expanding them per run (large layers, where the
# timing found that faster; N2UQ_AMX_COMPACT=1 / 0 forces it on / off).
FORMS = ("direct", "winograd", "winograd_stride2", "direct_compact")
ABI_VERSION = 10
MAX_BITS = 4
_lock = threading.Lock()
_loaded = {}


class CoreError(ValueError):
    """An argument the kernel core rejected (the message comes from the C library)."""


def build(force=False, verbose=True):
    """Compiles the core library if needed and returns its path (RuntimeError on failure).

    Building lives in n2uq_tf._native (shared with the delegate and the fused training kernel)."""
    return _native.build_core(force=force, verbose=verbose)


class ConvShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "in_height", "in_width", "in_channels", "out_channels", "kernel_height", "kernel_width",
        "stride_height", "stride_width", "dilation_height", "dilation_width",
        "pad_top", "pad_bottom", "pad_left", "pad_right", "act_bits", "weight_bits")]


# Output-stage step kinds (n2uq_core.h N2UQ_STEP_*, in id order from 1; custom_ops.STEP_KINDS mirrors them)
# and quantize modes (N2UQ_QUANTIZE_*).
STEP_KINDS = ("add", "mul", "prelu", "add_tensor", "relu", "relu6", "relu_n1_to_1")
MAX_OUTPUT_STEPS = 16
QUANTIZE_MODES = (None, "pack", "codes")


class OutputStep(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("values", ctypes.c_void_p), ("values_len", ctypes.c_int64)]


class PoolShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "in_height", "in_width", "channels", "filter_height", "filter_width", "stride_height",
        "stride_width", "pad_top", "pad_bottom", "pad_left", "pad_right")]


class Int8ConvParams(ctypes.Structure):
    _fields_ = [("input_scale", ctypes.c_float), ("input_zero_point", ctypes.c_int32),
                ("output_scale", ctypes.c_float), ("output_zero_point", ctypes.c_int32),
                ("output_min", ctypes.c_int32), ("output_max", ctypes.c_int32)]


class OutputStage(ctypes.Structure):
    _fields_ = [("num_steps", ctypes.c_int32), ("steps", OutputStep * MAX_OUTPUT_STEPS),
                ("float_after", ctypes.c_int32), ("quantize", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("thresholds", ctypes.c_void_p), ("num_thresholds", ctypes.c_int32), ("beta1", ctypes.c_float)]


class InputQuantizer(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_len", ctypes.c_int64), ("thresholds", ctypes.c_void_p),
                ("num_thresholds", ctypes.c_int32), ("beta1", ctypes.c_float)]


def _declare(lib):
    i32, i64, f32, sz = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_size_t
    ptr, char_p, shape_p = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ConvShape)
    err = [char_p, sz]
    signatures = {
        "n2uq_core_abi_version": ([], ctypes.c_int),
        "n2uq_isa_supported": ([ctypes.c_int], ctypes.c_int),
        "n2uq_resolve_isa": ([ctypes.c_int] + err, ctypes.c_int),
        "n2uq_isa_name": ([ctypes.c_int], char_p),
        "n2uq_pack_bitplanes": ([ptr, i64, i64, i32, i32, ptr, i64] + err, ctypes.c_int),
        "n2uq_quantize_codes": ([ptr, i64, ptr, i32, f32, i32, ptr, i64, ctypes.c_int, ctypes.c_int] + err,
                                ctypes.c_int),
        "n2uq_quantize_and_pack": ([ptr, i64, i64, i32, ptr, i32, f32, i32, ptr, i64, ctypes.c_int, ctypes.c_int]
                                   + err, ctypes.c_int),
        "n2uq_conv2d_output_size": ([shape_p, ctypes.POINTER(i32), ctypes.POINTER(i32)] + err, ctypes.c_int),
        "n2uq_conv2d_bitserial": ([shape_p, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int,
                                   ctypes.c_int] + err, ctypes.c_int),
        "n2uq_conv2d": ([shape_p, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int] + err, ctypes.c_int),
        "n2uq_path_name": ([ctypes.c_int], char_p),
        "n2uq_path_supported": ([ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "n2uq_cpu_features": ([], char_p),
        "n2uq_amx_status": ([], char_p),
        "n2uq_conv_plan_create": ([shape_p, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_void_p)] + err, ctypes.c_int),
        "n2uq_conv_plan_run": ([ptr, shape_p, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int] + err,
                               ctypes.c_int),
        "n2uq_conv_plan_run_stage": ([ptr, shape_p, ptr, i64, ptr, ptr, i64, ctypes.POINTER(OutputStage), ptr, i64,
                                      ptr, i64, ptr, i64, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_conv_plan_stage_fused": ([ptr], ctypes.c_int),
        "n2uq_conv_plan_run_quantizing": ([ptr, shape_p, ctypes.POINTER(InputQuantizer), ptr, i64, ptr, ptr, i64,
                                           ctypes.POINTER(OutputStage), ptr, i64, ptr, i64, ptr, i64, ctypes.c_int]
                                          + err, ctypes.c_int),
        "n2uq_conv_plan_quantizes_inline": ([ptr, shape_p, ctypes.c_int], ctypes.c_int),
        "n2uq_conv_plan_info": ([ptr, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
        "n2uq_conv_plan_form": ([ptr], ctypes.c_int),
        "n2uq_conv_plan_on_trial": ([ptr], ctypes.c_int),
        "n2uq_plan_trial_runs": ([], ctypes.c_int),
        "n2uq_conv_plan_destroy": ([ptr], None),
        "n2uq_fully_connected_shape": ([i32, i32, i32, i32, i32, shape_p] + err, ctypes.c_int),
        "n2uq_fully_connected": ([i32, i32, i32, i32, i32, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64,
                                  ctypes.c_int, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_depthwise_conv2d": ([shape_p, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int,
                                   ctypes.c_int] + err, ctypes.c_int),
        "n2uq_output_stage": ([ctypes.POINTER(OutputStage), i64, i32, ptr, i64, ptr, i64, ptr, i64, ptr, i64,
                               ctypes.c_int, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_max_pool2d_output_size": ([ctypes.POINTER(PoolShape), ctypes.POINTER(i32), ctypes.POINTER(i32)] + err,
                                        ctypes.c_int),
        "n2uq_max_pool2d": ([ctypes.POINTER(PoolShape), ptr, i64, ptr, i64, ctypes.c_int, ctypes.c_int] + err,
                            ctypes.c_int),
        "n2uq_max_pool2d_int8": ([ctypes.POINTER(PoolShape), ptr, i64, i32, ctypes.c_float, ptr, i64,
                                  ctypes.c_int, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_int8_conv_plan_create": ([shape_p, ptr, i64, ptr, i64, ptr, i64, ctypes.POINTER(Int8ConvParams),
                                        ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)] + err,
                                       ctypes.c_int),
        "n2uq_int8_conv_plan_run": ([ptr, shape_p, ptr, i64, ptr, i64, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_int8_conv_plan_info": ([ptr, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
        "n2uq_int8_conv_plan_destroy": ([ptr], None),
        "n2uq_float_conv_plan_create": ([shape_p, ptr, i64, ptr, i64, f32, f32, ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_void_p)] + err, ctypes.c_int),
        "n2uq_float_conv_plan_run": ([ptr, shape_p, ptr, i64, ptr, i64, ctypes.c_int] + err, ctypes.c_int),
        "n2uq_float_conv_plan_info": ([ptr, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
        "n2uq_float_conv_plan_destroy": ([ptr], None),
    }
    for name, (args, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = restype
    return lib


def library():
    """The loaded ctypes library (built on first use)."""
    with _lock:
        if "lib" not in _loaded:
            lib = _declare(ctypes.CDLL(build()))
            if lib.n2uq_core_abi_version() != ABI_VERSION:
                raise RuntimeError("n2uq kernel core ABI mismatch")
            _loaded["lib"] = lib
        return _loaded["lib"]


def _call(fn, *args):
    err = ctypes.create_string_buffer(512)
    status = fn(*args, err, len(err))
    if status != 0:
        raise CoreError(err.value.decode(errors="replace") or f"kernel core error {status}")
    return status


def _isa_id(isa):
    if isa is None:
        isa = "auto"
    if isa not in ISAS:
        raise CoreError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return ISAS.index(isa)


def _resolve_isa(requested):
    lib = library()
    err = ctypes.create_string_buffer(512)
    resolved = lib.n2uq_resolve_isa(_isa_id(requested), err, len(err))
    if resolved < 0:
        raise CoreError(err.value.decode(errors="replace"))
    return ISAS[resolved]


def isa(requested="auto"):
    """The ISA path that `requested` resolves to on this machine ("avx512", "avx2", "neon" or "portable")."""
    return _resolve_isa(requested)


def supported_isas():
    """Every concrete ISA path this CPU and build can run, slowest first."""
    lib = library()
    return [name for i, name in enumerate(ISAS) if i > 0 and lib.n2uq_isa_supported(i)]


def _path_id(path):
    if path is None:
        path = "auto"
    if path not in PATHS:
        raise CoreError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return PATHS.index(path)


def supported_paths(isa="auto"):
    """The conv paths this CPU and build can run under `isa` ("auto": the resolved ISA)."""
    lib = library()
    isa_id = ISAS.index(_resolve_isa(isa))
    return [name for i, name in enumerate(PATHS) if i > 0 and lib.n2uq_path_supported(isa_id, i)]


def supported_combinations():
    """Every (isa, path) pair this CPU and build can run."""
    return [(i, p) for i in supported_isas() for p in supported_paths(i)]


def cpu_features():
    """The CPU features the kernels detected (CPUID + XCR0 / HWCAP), e.g. ["avx2", "popcnt", ...]."""
    return library().n2uq_cpu_features().decode().split()


def amx_status():
    """Whether the "amx" path is offered and why (not): "available: ...", "unavailable: <reason>",
    or "emulated: ..." under the test hook N2UQ_AMX_EMULATE=1 (read once per process)."""
    return library().n2uq_amx_status().decode()


def plan_trial_runs():
    """Runs of an auto plan that its trial spans at most (path selection's runner-up tried on the
    plan's first runs; both sides, untimed runs included): warm each layer up with at least this
    many calls (a network: invokes) before timing steady calls."""
    return int(library().n2uq_plan_trial_runs())


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


def _as(array, dtype, what):
    array = np.asarray(array)
    if array.dtype != dtype:
        if dtype == np.uint8:
            if not np.issubdtype(array.dtype, np.integer):
                raise CoreError(f"{what} must hold integer codes, got {array.dtype}")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise CoreError(f"{what} codes must be in 0..255")
        elif dtype == np.uint64:
            raise CoreError(f"{what} must be uint64 packed words, got {array.dtype}")
        elif not np.issubdtype(array.dtype, np.number):
            raise CoreError(f"{what} must be numeric, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def words_per_plane(channels):
    return (int(channels) + 63) // 64


def pack_bitplanes(codes, bits):
    """Packs integer codes [..., C] into uint64 words [..., bits, ceil(C / 64)]."""
    codes = _as(codes, np.uint8, "codes")
    if codes.ndim < 1 or codes.shape[-1] < 1:
        raise CoreError(f"codes need a non-empty last (channel) axis, got shape {codes.shape}")
    channels = codes.shape[-1]
    positions = codes.size // channels
    words = words_per_plane(channels)
    out = np.empty(codes.shape[:-1] + (max(int(bits), 0), words), np.uint64) if 1 <= int(bits) <= 8 else \
        np.empty((1,), np.uint64)
    _call(library().n2uq_pack_bitplanes, _ptr(codes), codes.size, positions, channels, int(bits), _ptr(out),
          out.size)
    return out


def unpack_bitplanes(packed, channels):
    """Inverse of pack_bitplanes (NumPy only, for tests and inspection)."""
    packed = np.asarray(packed, np.uint64)
    bits_per_word = (packed[..., None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    planes = bits_per_word.reshape(packed.shape[:-1] + (-1,))[..., :channels]
    weights = (np.uint64(1) << np.arange(packed.shape[-2], dtype=np.uint64))[:, None]
    return (planes * weights).sum(axis=-2).astype(np.uint8)


def _thresholds(thresholds):
    return _as(np.ravel(np.asarray(thresholds, np.float32)), np.float32, "thresholds")


def quantize_codes(x, thresholds, beta1, bits, *, isa="auto", num_threads=1):
    """uint8 codes #{i : x * beta1 > thresholds[i]} of any-shaped float32 x."""
    x = _as(x, np.float32, "x")
    t = _thresholds(thresholds)
    out = np.empty(x.shape, np.uint8)
    _call(library().n2uq_quantize_codes, _ptr(x), x.size, _ptr(t), t.size, float(np.float32(beta1)), int(bits),
          _ptr(out), out.size, _isa_id(isa), int(num_threads))
    return out


def quantize_and_pack(x, thresholds, beta1, bits, *, isa="auto", num_threads=1):
    """Fused quantize + pack of float32 x [..., C] -> uint64 [..., bits, ceil(C / 64)]."""
    x = _as(x, np.float32, "x")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise CoreError(f"x needs a non-empty last (channel) axis, got shape {x.shape}")
    t = _thresholds(thresholds)
    channels = x.shape[-1]
    bits = int(bits)
    out = np.empty(x.shape[:-1] + (bits if 1 <= bits <= 8 else 1, words_per_plane(channels)), np.uint64)
    _call(library().n2uq_quantize_and_pack, _ptr(x), x.size, x.size // channels, channels, _ptr(t), t.size,
          float(np.float32(beta1)), bits, _ptr(out), out.size, _isa_id(isa), int(num_threads))
    return out


def _pair(value, what):
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise CoreError(f"{what} must be an int or a pair, got {value!r}")
    return value


def _padding(padding):
    """(top, bottom, left, right) from an int, a pair (vertical, horizontal) or a 4-tuple."""
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * 4
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 4:
        return padding
    raise CoreError(f"padding must be an int, a pair or (top, bottom, left, right), got {padding!r}")


def conv_shape(batch, in_height, in_width, in_channels, out_channels, kernel_size, *, strides=1, dilations=1,
               padding=0, act_bits, weight_bits):
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilations, "dilations")
    top, bottom, left, right = _padding(padding)
    return ConvShape(batch, in_height, in_width, in_channels, out_channels, kh, kw, sh, sw, dh, dw, top, bottom,
                     left, right, act_bits, weight_bits)


def output_size(shape):
    """(out_height, out_width) of a ConvShape; raises CoreError for an invalid shape."""
    oh, ow = ctypes.c_int32(), ctypes.c_int32()
    _call(library().n2uq_conv2d_output_size, ctypes.byref(shape), ctypes.byref(oh), ctypes.byref(ow))
    return oh.value, ow.value


def _affine(multiplier, bias, channels):
    multiplier = np.ones(channels, np.float32) if multiplier is None else _as(np.ravel(multiplier), np.float32,
                                                                              "multiplier")
    bias = np.zeros(channels, np.float32) if bias is None else _as(np.ravel(bias), np.float32, "bias")
    if multiplier.size != bias.size:
        raise CoreError(f"multiplier ({multiplier.size}) and bias ({bias.size}) lengths differ")
    return multiplier, bias


def _outputs(shape_tuple, output):
    if output not in ("float", "int32", "both"):
        raise CoreError(f"output must be 'float', 'int32' or 'both', got {output!r}")
    out_f = np.empty(shape_tuple, np.float32) if output in ("float", "both") else None
    out_i = np.empty(shape_tuple, np.int32) if output in ("int32", "both") else None
    size = int(np.prod(shape_tuple))
    return out_f, out_i, size


def _result(out_f, out_i, output):
    return {"float": out_f, "int32": out_i}.get(output, (out_f, out_i))


def conv2d(packed_input, packed_weights, in_channels, act_bits, weight_bits, multiplier=None, bias=None, *,
           strides=1, dilations=1, padding=0, output="float", isa="auto", path="auto", num_threads=1):
    """Conv2d on packed codes (any path; see the module docstring).

    packed_input: uint64 [N, H, W, act_bits, words] (pack_bitplanes of NHWC codes);
    packed_weights: uint64 [OC, KH, KW, weight_bits, words] (pack_bitplanes of [OC, KH, KW, IC] codes);
    padding: int, (vertical, horizontal) or (top, bottom, left, right).
    Returns [N, OH, OW, OC]: float32 multiplier * (2 S_mk - n_w S_m) + bias, the int32
    integer, or both (output="float" | "int32" | "both").
    """
    x = _as(packed_input, np.uint64, "packed_input")
    w = _as(packed_weights, np.uint64, "packed_weights")
    if x.ndim != 5 or w.ndim != 5:
        raise CoreError(f"packed_input and packed_weights must be 5-D, got {x.shape} and {w.shape}")
    n, h, wd = x.shape[:3]
    oc, kh, kw = w.shape[:3]
    shape = conv_shape(n, h, wd, in_channels, oc, (kh, kw), strides=strides, dilations=dilations,
                       padding=padding, act_bits=act_bits, weight_bits=weight_bits)
    oh, ow = output_size(shape)
    multiplier, bias = _affine(multiplier, bias, oc)
    out_f, out_i, size = _outputs((n, oh, ow, oc), output)
    _call(library().n2uq_conv2d, ctypes.byref(shape), _ptr(x), x.size, _ptr(w), w.size,
          _ptr(multiplier), _ptr(bias), multiplier.size, None if out_f is None else _ptr(out_f),
          None if out_i is None else _ptr(out_i), size, _isa_id(isa), _path_id(path), int(num_threads))
    return _result(out_f, out_i, output)


conv2d_bitserial = conv2d  # the name predates the other paths


def fully_connected(packed_input, packed_weights, in_features, act_bits, weight_bits, multiplier=None, bias=None,
                    *, output="float", isa="auto", path="auto", num_threads=1):
    """packed_input uint64 [batch, act_bits, words], packed_weights [out, weight_bits, words] -> [batch, out]."""
    x = _as(packed_input, np.uint64, "packed_input")
    w = _as(packed_weights, np.uint64, "packed_weights")
    if x.ndim != 3 or w.ndim != 3:
        raise CoreError(f"packed_input and packed_weights must be 3-D, got {x.shape} and {w.shape}")
    batch, out_features = x.shape[0], w.shape[0]
    shape = ConvShape()
    _call(library().n2uq_fully_connected_shape, batch, int(in_features), out_features, int(act_bits),
          int(weight_bits), ctypes.byref(shape))
    multiplier, bias = _affine(multiplier, bias, out_features)
    out_f, out_i, size = _outputs((batch, out_features), output)
    _call(library().n2uq_conv2d, ctypes.byref(shape), _ptr(x), x.size, _ptr(w), w.size, _ptr(multiplier),
          _ptr(bias), multiplier.size, None if out_f is None else _ptr(out_f), None if out_i is None else _ptr(out_i),
          size, _isa_id(isa), _path_id(path), int(num_threads))
    return _result(out_f, out_i, output)


def _input_quantizer(x, thresholds, beta1):
    """(InputQuantizer, the arrays it points into) for the float input x and its quantizer."""
    x = _as(x, np.float32, "x")
    t = _as(thresholds, np.float32, "thresholds")
    return InputQuantizer(_ptr(x), x.size, _ptr(t), t.size, float(beta1)), (x, t)


class ConvPlan:
    """A conv layer's weights prepared once for one path (n2uq_conv_plan_create).

    `shape` is a ConvShape (conv_shape or fully_connected_shape) whose batch and input size
    path selection times on; `run` accepts any batch and input size with the same filter.
    `isa`, `path` and `form` (one of FORMS) say what the plan runs. Where path="auto" found a
    runner-up close to the winner, the plan's first runs time both (`on_trial` until then) and
    keep the faster, so `path` and `form` can change after them; the outputs do not.
    """

    def __init__(self, shape, packed_weights, *, isa="auto", path="auto", num_threads=1):
        self._lib = library()
        w = _as(packed_weights, np.uint64, "packed_weights")
        self.shape = shape
        self._handle = ctypes.c_void_p()
        _call(self._lib.n2uq_conv_plan_create, ctypes.byref(shape), _ptr(w), w.size, _isa_id(isa), _path_id(path),
              int(num_threads), ctypes.byref(self._handle))

    def _info(self):
        isa_id, path_id = ctypes.c_int(), ctypes.c_int()
        self._lib.n2uq_conv_plan_info(self._handle, ctypes.byref(isa_id), ctypes.byref(path_id))
        return ISAS[isa_id.value], PATHS[path_id.value]

    @property
    def isa(self):
        return self._info()[0]

    @property
    def path(self):
        return self._info()[1]

    @property
    def form(self):
        return FORMS[self._lib.n2uq_conv_plan_form(self._handle)]

    @property
    def on_trial(self):
        """Whether the plan's first runs are still trying the selection's winner and runner-up."""
        return bool(self._lib.n2uq_conv_plan_on_trial(self._handle))

    def run(self, packed_input, multiplier=None, bias=None, *, shape=None, output="float", num_threads=1):
        """packed_input as for conv2d (5-D) or fully_connected (3-D); returns the same outputs."""
        shape = shape or self.shape
        x = _as(packed_input, np.uint64, "packed_input")
        oh, ow = output_size(shape)
        multiplier, bias = _affine(multiplier, bias, shape.out_channels)
        out_f, out_i, size = _outputs((shape.batch, oh, ow, shape.out_channels), output)
        _call(self._lib.n2uq_conv_plan_run, self._handle, ctypes.byref(shape), _ptr(x), x.size, _ptr(multiplier),
              _ptr(bias), multiplier.size, None if out_f is None else _ptr(out_f),
              None if out_i is None else _ptr(out_i), size, int(num_threads))
        return _result(out_f, out_i, output)

    @property
    def stage_fused(self):
        """Whether run_stage applies the output stage in the conv's own output pass."""
        return bool(self._lib.n2uq_conv_plan_stage_fused(self._handle))

    def run_stage(self, packed_input, multiplier, bias, steps=(), *, float_after=None, quantize=None, bits=None,
                  thresholds=None, beta1=1.0, shape=None, num_threads=1):
        """The conv then an output stage (n2uq_conv_plan_run_stage): output_stage's arguments and
        return value over the conv's float output [N, OH, OW, OC], which is not returned."""
        shape = shape or self.shape
        x = _as(packed_input, np.uint64, "packed_input")
        oh, ow = output_size(shape)
        multiplier, bias = _affine(multiplier, bias, shape.out_channels)
        out_shape = (shape.batch, oh, ow, shape.out_channels)
        stage, _keep, out_f, out_q = _stage_call(out_shape, steps, float_after, quantize, bits, thresholds, beta1)
        _call(self._lib.n2uq_conv_plan_run_stage, self._handle, ctypes.byref(shape), _ptr(x), x.size,
              _ptr(multiplier), _ptr(bias), multiplier.size, ctypes.byref(stage),
              *_stage_outputs(out_f, out_q, quantize), int(num_threads))
        return out_f, out_q

    def quantizes_inline(self, *, shape=None, num_threads=1):
        """Whether run_quantizing (without codes kept) quantizes inside the conv on this shape."""
        shape = shape or self.shape
        return self._lib.n2uq_conv_plan_quantizes_inline(self._handle, ctypes.byref(shape), int(num_threads)) == 1

    def run_quantizing(self, x, thresholds, multiplier=None, bias=None, *, beta1=1.0, shape=None, packed=None,
                       num_threads=1):
        """The quantize-and-pack of the float input x [N, H, W, C] (the shape's act_bits, thresholds,
        beta1) and the conv, in one call (n2uq_conv_plan_run_quantizing): run's float output. packed: a
        uint64 array of the packed input's size to receive the codes (the conv then quantizes first)."""
        shape = shape or self.shape
        q, _keep = _input_quantizer(x, thresholds, beta1)
        oh, ow = output_size(shape)
        multiplier, bias = _affine(multiplier, bias, shape.out_channels)
        out = np.empty((shape.batch, oh, ow, shape.out_channels), np.float32)
        _call(self._lib.n2uq_conv_plan_run_quantizing, self._handle, ctypes.byref(shape), ctypes.byref(q),
              None if packed is None else _ptr(packed), 0 if packed is None else packed.size, _ptr(multiplier),
              _ptr(bias), multiplier.size, None, _ptr(out), out.size, None, 0, None, 0, int(num_threads))
        return out

    def run_stage_quantizing(self, x, thresholds, multiplier, bias, steps=(), *, beta1=1.0, float_after=None,
                             quantize=None, bits=None, stage_thresholds=None, stage_beta1=1.0, shape=None,
                             num_threads=1):
        """run_quantizing's input, run_stage's output stage and return value (the stage's quantizer:
        bits, stage_thresholds, stage_beta1)."""
        shape = shape or self.shape
        q, _keep = _input_quantizer(x, thresholds, beta1)
        oh, ow = output_size(shape)
        multiplier, bias = _affine(multiplier, bias, shape.out_channels)
        out_shape = (shape.batch, oh, ow, shape.out_channels)
        stage, _keep, out_f, out_q = _stage_call(out_shape, steps, float_after, quantize, bits, stage_thresholds,
                                                 stage_beta1)
        _call(self._lib.n2uq_conv_plan_run_quantizing, self._handle, ctypes.byref(shape), ctypes.byref(q), None, 0,
              _ptr(multiplier), _ptr(bias), multiplier.size, ctypes.byref(stage),
              *_stage_outputs(out_f, out_q, quantize), int(num_threads))
        return out_f, out_q

    def close(self):
        if getattr(self, "_handle", None):
            self._lib.n2uq_conv_plan_destroy(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


class _BuiltinConvPlan:
    """What Int8ConvPlan and FloatConvPlan share: a filter [OC, KH, KW, IC] prepared once, the
    plan's own shape (one image the size of the dilated filter; the shape's bit widths are ignored),
    and runs on any batch and input size."""

    _destroy = None  # the plan's destroy function's name

    def _shape_of_filter(self, w, strides, dilations, padding):
        if w.ndim != 4:
            raise CoreError(f"filter must be 4-D [OC, KH, KW, IC], got shape {w.shape}")
        self.out_channels, kh, kw, self.in_channels = (int(d) for d in w.shape)
        self._geometry = dict(kernel_size=(kh, kw), strides=strides, dilations=dilations, padding=padding)
        dh, dw = _pair(dilations, "dilations")
        return conv_shape(1, (kh - 1) * dh + 1, (kw - 1) * dw + 1, self.in_channels, self.out_channels, (kh, kw),
                          strides=strides, dilations=dilations, act_bits=1, weight_bits=1)

    def _run(self, function, x, dtype, num_threads):
        x = _as(x, dtype, "x")
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise CoreError(f"x must be [N, H, W, {self.in_channels}], got shape {x.shape}")
        g = self._geometry
        shape = conv_shape(x.shape[0], x.shape[1], x.shape[2], self.in_channels, self.out_channels,
                           g["kernel_size"], strides=g["strides"], dilations=g["dilations"], padding=g["padding"],
                           act_bits=1, weight_bits=1)
        oh, ow = output_size(shape)
        out = np.empty((x.shape[0], oh, ow, self.out_channels), dtype)
        _call(function, self._handle, ctypes.byref(shape), _ptr(x), x.size, _ptr(out), out.size, int(num_threads))
        return out

    def close(self):
        if getattr(self, "_handle", None):
            getattr(self._lib, self._destroy)(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


class Int8ConvPlan(_BuiltinConvPlan):
    """TFLite's int8 CONV_2D prepared once (n2uq_int8_conv_plan_create), for few input channels.

    filter int8 [OC, KH, KW, IC] (symmetric), filter_scales [OC] or one scale, bias int32 [OC] or
    None; input and output int8 with their (scale, zero point); output_range the fused
    activation's quantized (min, max). `run(x)` takes int8 [N, H, W, IC] and returns int8
    [N, OH, OW, OC], requantized as XNNPACK does (n2uq_core.h). `padding` as for conv_shape.
    """

    _destroy = "n2uq_int8_conv_plan_destroy"

    def __init__(self, filter, filter_scales, bias, input_quant, output_quant, *, strides=1, dilations=1, padding=0,
                 output_range=(-128, 127), isa="auto", path="auto"):
        self._lib = library()
        w = _as(filter, np.int8, "filter")
        scales = _as(np.atleast_1d(filter_scales), np.float32, "filter_scales")
        b = None if bias is None else _as(bias, np.int32, "bias")
        shape = self._shape_of_filter(w, strides, dilations, padding)
        params = Int8ConvParams(float(input_quant[0]), int(input_quant[1]), float(output_quant[0]),
                                int(output_quant[1]), int(output_range[0]), int(output_range[1]))
        self._handle = ctypes.c_void_p()
        _call(self._lib.n2uq_int8_conv_plan_create, ctypes.byref(shape), _ptr(w), w.size,
              None if b is None else _ptr(b), 0 if b is None else b.size, _ptr(scales), scales.size,
              ctypes.byref(params), _isa_id(isa), _path_id(path), ctypes.byref(self._handle))
        isa_id, path_id = ctypes.c_int(), ctypes.c_int()
        self._lib.n2uq_int8_conv_plan_info(self._handle, ctypes.byref(isa_id), ctypes.byref(path_id))
        self.isa, self.path = ISAS[isa_id.value], PATHS[path_id.value]

    def run(self, x, *, num_threads=1):
        return self._run(self._lib.n2uq_int8_conv_plan_run, x, np.int8, num_threads)


class FloatConvPlan(_BuiltinConvPlan):
    """TFLite's float CONV_2D prepared once (n2uq_float_conv_plan_create), for few input channels.

    filter float32 [OC, KH, KW, IC], bias [OC] or None, output_range the fused activation's clamp
    ((-inf, inf) for none). `run(x)` takes float32 [N, H, W, IC] and returns [N, OH, OW, OC]: TFLite's
    result up to float rounding (float32 sums in this kernel's order). `padding` as for conv_shape.
    """

    _destroy = "n2uq_float_conv_plan_destroy"

    def __init__(self, filter, bias=None, *, strides=1, dilations=1, padding=0,
                 output_range=(-np.inf, np.inf), isa="auto"):
        self._lib = library()
        w = _as(filter, np.float32, "filter")
        b = None if bias is None else _as(bias, np.float32, "bias")
        shape = self._shape_of_filter(w, strides, dilations, padding)
        self._handle = ctypes.c_void_p()
        _call(self._lib.n2uq_float_conv_plan_create, ctypes.byref(shape), _ptr(w), w.size,
              None if b is None else _ptr(b), 0 if b is None else b.size, float(output_range[0]),
              float(output_range[1]), _isa_id(isa), ctypes.byref(self._handle))
        isa_id = ctypes.c_int()
        self._lib.n2uq_float_conv_plan_info(self._handle, ctypes.byref(isa_id))
        self.isa = ISAS[isa_id.value]

    def run(self, x, *, num_threads=1):
        return self._run(self._lib.n2uq_float_conv_plan_run, x, np.float32, num_threads)


def fully_connected_shape(batch, in_features, out_features, act_bits, weight_bits):
    """The ConvShape of a fully connected layer (a 1x1 conv over a 1 x batch image)."""
    shape = ConvShape()
    _call(library().n2uq_fully_connected_shape, int(batch), int(in_features), int(out_features), int(act_bits),
          int(weight_bits), ctypes.byref(shape))
    return shape


def depthwise_conv2d(input_codes, weight_codes, act_bits, weight_bits, multiplier=None, bias=None, *, strides=1,
                     dilations=1, padding=0, output="float", isa="auto", num_threads=1):
    """Depthwise conv on codes: input uint8 [N, H, W, C], weights uint8 [KH, KW, C, M] (or [KH, KW, C*M])."""
    x = _as(input_codes, np.uint8, "input_codes")
    w = _as(weight_codes, np.uint8, "weight_codes")
    if x.ndim != 4 or w.ndim not in (3, 4):
        raise CoreError(f"input must be 4-D and weights 3-D or 4-D, got {x.shape} and {w.shape}")
    n, h, wd, c = x.shape
    kh, kw = w.shape[:2]
    out_channels = int(np.prod(w.shape[2:]))
    shape = conv_shape(n, h, wd, c, out_channels, (kh, kw), strides=strides, dilations=dilations, padding=padding,
                       act_bits=act_bits, weight_bits=weight_bits)
    oh, ow = output_size(shape)
    multiplier, bias = _affine(multiplier, bias, out_channels)
    out_f, out_i, size = _outputs((n, oh, ow, out_channels), output)
    _call(library().n2uq_depthwise_conv2d, ctypes.byref(shape), _ptr(x), x.size, _ptr(w), w.size, _ptr(multiplier),
          _ptr(bias), multiplier.size, None if out_f is None else _ptr(out_f),
          None if out_i is None else _ptr(out_i), size, _isa_id(isa), int(num_threads))
    return _result(out_f, out_i, output)


def output_stage(values, steps=(), *, float_after=None, quantize=None, bits=None, thresholds=None, beta1=1.0,
                 isa="auto", num_threads=1):
    """The output stage of the fused layer ops (n2uq_output_stage) on float32 values [..., C].

    steps: [(kind, values or None)] with kind in STEP_KINDS ("add" / "mul" / "prelu": [C] values,
    "add_tensor": values of the shape of `values`, the ReLUs: None). float_after: return the float
    tensor after that many steps (None: no float output); quantize: None, "pack" (uint64
    [..., bits, words]) or "codes" (uint8 [..., C]) of the values after every step, with `bits`,
    `thresholds` and `beta1` as `quantize_and_pack`. Returns (float or None, quantized or None).
    """
    x = _as(values, np.float32, "values")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise CoreError(f"values need a non-empty last (channel) axis, got shape {x.shape}")
    stage, _keep, out_f, out_q = _stage_call(x.shape, steps, float_after, quantize, bits, thresholds, beta1)
    positions = x.size // x.shape[-1]
    _call(library().n2uq_output_stage, ctypes.byref(stage), positions, x.shape[-1], _ptr(x), x.size,
          *_stage_outputs(out_f, out_q, quantize), _isa_id(isa), int(num_threads))
    return out_f, out_q


def _stage_call(shape, steps, float_after, quantize, bits, thresholds, beta1):
    """(OutputStage, arrays it points into, float output or None, quantized output or None) for an
    output stage over values of `shape` (output_stage's arguments)."""
    channels = shape[-1]
    steps = list(steps)
    if len(steps) > MAX_OUTPUT_STEPS:
        raise CoreError(f"at most {MAX_OUTPUT_STEPS} steps, got {len(steps)}")
    if quantize not in QUANTIZE_MODES:
        raise CoreError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    stage = OutputStage()
    stage.num_steps = len(steps)
    keep = []
    for i, (kind, step_values) in enumerate(steps):
        if kind not in STEP_KINDS:
            raise CoreError(f"step kind must be one of {', '.join(STEP_KINDS)}, got {kind!r}")
        stage.steps[i].kind = STEP_KINDS.index(kind) + 1
        if step_values is not None:
            array = _as(np.ravel(step_values), np.float32, f"step {i} values")
            keep.append(array)
            stage.steps[i].values = array.ctypes.data
            stage.steps[i].values_len = array.size
    stage.float_after = -1 if float_after is None else int(float_after)
    stage.quantize = QUANTIZE_MODES.index(quantize)
    out_f = np.empty(shape, np.float32) if float_after is not None else None
    out_q = None
    if quantize is not None:
        t = _thresholds(thresholds)
        keep.append(t)
        stage.bits, stage.thresholds, stage.num_thresholds = int(bits), t.ctypes.data, t.size
        stage.beta1 = float(np.float32(beta1))
        if quantize == "pack":
            out_q = np.empty(tuple(shape[:-1]) + (int(bits) if 1 <= int(bits) <= 8 else 1, words_per_plane(channels)),
                             np.uint64)
        else:
            out_q = np.empty(shape, np.uint8)
    return stage, keep, out_f, out_q


def _stage_outputs(out_f, out_q, quantize):
    """The (out_float, len, out_packed, len, out_codes, len) arguments of the stage calls."""
    packed = out_q if quantize == "pack" else None
    codes = out_q if quantize == "codes" else None
    return (None if out_f is None else _ptr(out_f), 0 if out_f is None else out_f.size,
            None if packed is None else _ptr(packed), 0 if packed is None else packed.size,
            None if codes is None else _ptr(codes), 0 if codes is None else codes.size)


def max_pool2d(x, pool_size, *, strides=None, padding=0, num_threads=1, zero_point=None, scale=None, isa="auto"):
    """Max pooling of float32 x [N, H, W, C] (n2uq_max_pool2d): the layer of N2UQMaxPool2DFused.

    padding: zeros around the input (an int, a pair (vertical, horizontal) or (top, bottom, left,
    right)), as a PAD before a 'valid' pool; a window position in it counts as 0.0. strides default
    to pool_size. With `zero_point` and `scale`, x is int8 (n2uq_max_pool2d_int8): padding counts as
    zero_point, and each max m comes out dequantized, float32(m - zero_point) * scale. `isa` as for
    the other kernels ("auto": the best this CPU runs, or N2UQ_KERNEL_ISA).
    """
    if (zero_point is None) != (scale is None):
        raise CoreError("give both zero_point and scale (an int8 input), or neither")
    if scale is not None and np.asarray(x).dtype != np.int8:
        raise CoreError(f"x must be int8 with zero_point and scale, got {np.asarray(x).dtype}")
    x = _as(x, np.float32 if scale is None else np.int8, "x")
    if x.ndim != 4:
        raise CoreError(f"x must be [N, H, W, C], got shape {x.shape}")
    fh, fw = _pair(pool_size, "pool_size")
    sh, sw = _pair(pool_size if strides is None else strides, "strides")
    top, bottom, left, right = _padding(padding)
    shape = PoolShape(*x.shape, fh, fw, sh, sw, top, bottom, left, right)
    lib = library()
    oh, ow = ctypes.c_int32(), ctypes.c_int32()
    _call(lib.n2uq_max_pool2d_output_size, ctypes.byref(shape), ctypes.byref(oh), ctypes.byref(ow))
    out = np.empty((x.shape[0], oh.value, ow.value, x.shape[3]), np.float32)
    if scale is None:
        _call(lib.n2uq_max_pool2d, ctypes.byref(shape), _ptr(x), x.size, _ptr(out), out.size, _isa_id(isa),
              int(num_threads))
    else:
        _call(lib.n2uq_max_pool2d_int8, ctypes.byref(shape), _ptr(x), x.size, int(zero_point), float(scale), _ptr(out),
              out.size, _isa_id(isa), int(num_threads))
    return out
