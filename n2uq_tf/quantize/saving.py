"""Saving that never leaves a half-written model, and loads that say when a file is incomplete.

Keras writes a model in place: a save that fails part-way (a full disk, Ctrl-C, an error while
writing the optimizer state) leaves a file that looks like a model and fails to load later with
errors such as ``KeyError: component not found``. `save_model` writes through
`n2uq_tf._io.atomic_path`, so the destination holds the whole new model or is left as it was;
the models `quantize_model` and `load_model` return have their ``save`` routed through it.
`incomplete_reason` recognises the half-written files that other writers leave.
"""

import glob
import os
import types
import zipfile
from typing import Any

import tensorflow as tf

from n2uq_tf._io import atomic_path
from n2uq_tf._keras import keras

def _writes_folder(path, save_format):
    """True when tf_keras saves ``path`` (with ``save_format``) as a SavedModel folder."""
    if save_format is not None:
        return save_format in ("tf", "tensorflow")
    return os.path.splitext(path)[1].lower() not in (".keras", ".h5", ".hdf5")


def save_model(model: keras.Model, filepath: str | os.PathLike[str], overwrite: bool = True,
               save_format: str | None = None, **kwargs: Any) -> None:
    """``model.save(filepath, ...)``, atomically: ``filepath`` ends up holding the whole model or unchanged.

    Takes the arguments of tf_keras's ``Model.save`` (a ``.keras`` or ``.h5`` file, or a SavedModel
    folder for other paths or ``save_format="tf"``). The model is written to a temporary sibling
    and renamed into place once the write returned, so a failure or an interrupt never leaves a
    partial model at ``filepath``. ``overwrite=False`` raises FileExistsError for an existing
    ``filepath`` (where Keras would prompt).
    """
    if not isinstance(filepath, (str, os.PathLike)) or "://" in os.fspath(filepath):
        # An open h5py.File (the caller owns it) or a remote URL (Keras stages those locally itself).
        return _class_save(model, filepath, overwrite=overwrite, save_format=save_format, **kwargs)
    filepath = os.fspath(filepath)
    if not overwrite and os.path.lexists(filepath):
        raise FileExistsError(f"{filepath!r} exists and overwrite=False")
    with atomic_path(filepath, directory=_writes_folder(filepath, save_format)) as tmp:
        _class_save(model, tmp, overwrite=True, save_format=save_format, **kwargs)


def _class_save(model, filepath, **kwargs):
    # The class's save, not the instance's: `make_save_atomic` routes the instance's here.
    return type(model).save(model, filepath, **kwargs)


def make_save_atomic(model):
    """Routes ``model.save`` through `save_model` (for this model object only); returns the model.

    Keras callbacks (ModelCheckpoint) and ``DistillationModel.save`` call ``model.save`` too, so
    they write atomically as well.
    """
    model.save = types.MethodType(save_model, model)
    return model


def restore_saved_model_optimizer(model, path):
    """Reads the optimizer state (iterations, slots) of a SavedModel into the loaded model's optimizer.

    A tf_keras SavedModel holds it (the model's checkpoint tracks its optimizer), but tf_keras's
    loader compiles a fresh optimizer and restores nothing into it, so training restarted from
    step 0 with empty moments after every SavedModel reload.
    """
    optimizer = getattr(model, "optimizer", None)
    prefix = os.path.join(path, "variables", "variables")
    if optimizer is None or not any(key.startswith("optimizer/")
                                    for key in tf.train.load_checkpoint(prefix).get_variable_to_shape_map()):
        return  # saved uncompiled, or with include_optimizer=False
    if hasattr(optimizer, "build"):  # tf_keras optimizers create their slots in build (legacy ones restore them later)
        optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(optimizer=optimizer).read(prefix)
    status.expect_partial()  # the rest of the checkpoint is the model, already loaded
    status.assert_existing_objects_matched()


def incomplete_reason(path, fmt):
    """What is missing from a saved model that failed to load, or None when nothing visibly is.

    ``fmt`` is "Keras", "HDF5" or "SavedModel" (as `load_model` names them).
    """
    check = _GAP_CHECKS.get(fmt)
    return None if check is None else check[1](path)


def incomplete_message(path, fmt, error):
    """The error message for a model file that failed to load because it is incomplete, or None."""
    gap = incomplete_reason(path, fmt)
    if gap is None:
        return None
    return (f"{path!r} is an incomplete {_GAP_CHECKS[fmt][0]}: {gap}. It was probably written by a save "
            "that failed or was interrupted, or copied in part; save the model again (n2uq_tf.save_model "
            f"writes atomically). {type(error).__name__}: {error}")


# A truncated or half-written file still starts as its format does; one that does not is no model.
_ZIP_SIGNATURE = b"PK\x03\x04"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _starts_with(path, signature):
    with open(path, "rb") as f:
        return f.read(len(signature)) == signature


def _keras_archive_gap(path):
    if not _starts_with(path, _ZIP_SIGNATURE):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for required in ("config.json", "metadata.json"):
                if required not in names:
                    return f"the archive has no {required}"
            if not names & {"model.weights.h5", "model.weights.npz"}:
                return "the archive has no model.weights.h5 (the weights)"
            damaged = archive.testzip()
            if damaged is not None:
                return f"{damaged} in the archive fails its checksum"
    except zipfile.BadZipFile as error:
        return f"it is not a whole zip archive ({error})"
    return None


def _hdf5_gap(path):
    import h5py

    def names(attribute):
        return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in attribute]

    if not _starts_with(path, _HDF5_SIGNATURE):
        return None
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        return f"HDF5 cannot open it ({error})"
    with handle:
        if "model_config" not in handle.attrs:
            # save_weights files have their layer list at the top: not a model, not a broken one.
            return None if "layer_names" in handle.attrs else "it has no model_config"
        weights = handle.get("model_weights")
        if weights is None or "layer_names" not in weights.attrs:
            return "it has no model weights"
        for layer in names(weights.attrs["layer_names"]):
            group = weights.get(layer)
            if group is None or "weight_names" not in group.attrs:
                return f"the weights of layer {layer!r} are missing"
            for weight in names(group.attrs["weight_names"]):
                if weight not in group:
                    return f"weight {weight!r} of layer {layer!r} is missing"
        optimizer = handle.get("optimizer_weights")
        if optimizer is not None:
            if "weight_names" not in optimizer.attrs:
                return "the optimizer state is missing"
            for weight in names(optimizer.attrs["weight_names"]):
                if weight not in optimizer:
                    return f"optimizer variable {weight!r} is missing"
    return None


def _saved_model_gap(path):
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model_pb2.SavedModel().ParseFromString(f.read())
    except (OSError, DecodeError) as error:
        return f"saved_model.pb cannot be read ({error})"
    variables = os.path.join(path, "variables")
    if not os.path.exists(os.path.join(variables, "variables.index")):
        return "variables/variables.index is missing"
    shards = glob.glob(os.path.join(glob.escape(variables), "variables.data-*-of-*"))
    if not shards:
        return "variables/variables.data-* (the variable values) are missing"
    expected = int(shards[0].rsplit("-of-", 1)[1])
    if len(shards) != expected:
        return f"{len(shards)} of the {expected} variables/variables.data-* shards are present"
    if not os.path.exists(os.path.join(path, "keras_metadata.pb")):
        return ("keras_metadata.pb is missing (a Keras save that stopped before its end, or a SavedModel "
                "written by tf.saved_model.save, which tf_keras cannot load as a Keras model)")
    return None


# load_model's format name -> (what it is called in messages, the check of what it misses)
_GAP_CHECKS = {"Keras": (".keras file", _keras_archive_gap), "HDF5": (".h5 file", _hdf5_gap),
               "SavedModel": ("SavedModel folder", _saved_model_gap)}

__all__ = ["incomplete_message", "incomplete_reason", "make_save_atomic", "restore_saved_model_optimizer", "save_model"]
