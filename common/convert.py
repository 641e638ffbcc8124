"""Convert a quantized QANA model to Akida, guard the result, save/load/hash it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tf_keras as keras

from common.errors import ModelError
from common.log import get_logger
from common.models import VariantInfo, get_variant
from common.quantize import akida_version

if TYPE_CHECKING:
    import akida

log = get_logger("convert")


def _check_dequantizers(qmodel: keras.Model) -> None:
    """Refuse a quantized model with a Dequantizer before its end (quantization stopped there)."""
    from quantizeml.layers import Dequantizer

    outputs = set(qmodel.output_names)
    for layer in qmodel.layers:
        if isinstance(layer, Dequantizer) and layer.name not in outputs:
            raise ModelError(
                f"quantized model {qmodel.name!r} has a Dequantizer {layer.name!r} in the middle: "
                "quantization stopped there and Akida conversion would silently truncate the model",
                "remove the layer that does not quantize (see common.models.check_convertible)",
            )


def convert_model(qmodel: keras.Model, variant: str | VariantInfo) -> akida.Model:
    """Convert a quantized model to Akida and check that the whole model was converted.

    Parameters
    ----------
    qmodel : tf_keras.Model
        Output of :func:`common.quantize.quantize_model` for the same variant.
    variant : str | VariantInfo
        Selects the Akida version used for conversion.

    Returns
    -------
    akida.Model
        Model with output shape ``(1, 1, num_classes)``, taking raw uint8 ``(N, H, W, 3)``.

    Raises
    ------
    ModelError
        Float variant, cnn2snn refusal, or an Akida output shape other than
        ``(1, 1, num_classes)`` (a silently truncated conversion).
    """
    from cnn2snn import convert

    info = get_variant(variant)
    _check_dequantizers(qmodel)
    num_classes = int(qmodel.output_shape[-1])
    with akida_version(info):
        try:
            ak_model = convert(qmodel)
        except (RuntimeError, ValueError, AssertionError, TypeError) as err:
            raise ModelError(
                f"cnn2snn refused to convert {qmodel.name!r} for {info.name}: {err}",
                "check the layer named above against DESIGN.md §2",
            ) from err
    shape = tuple(int(d) for d in ak_model.output_shape)
    if shape != (1, 1, num_classes):
        raise ModelError(
            f"the Akida model of {qmodel.name!r} outputs {list(shape)} instead of "
            f"[1, 1, {num_classes}]: conversion was silently truncated",
            "remove the layers that do not quantize (tensor×tensor multiply, Conv1D, sigmoid)",
        )
    log.info("converted %s to Akida %s: %d layers", qmodel.name, info.akida_version,
             len(ak_model.layers))
    return ak_model


def model_hash(ak_model: akida.Model) -> str:
    """Return the sha256 hex digest of the Akida model's serialized bytes."""
    return hashlib.sha256(bytes(ak_model.to_buffer())).hexdigest()


def save_akida(
    ak_model: akida.Model, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write an Akida model atomically (temporary file in the same folder, then rename).

    With ``meta`` (:func:`common.model_meta.model_meta`) the metadata file that scoring needs
    (classes, input size, preprocessing) is written beside it first.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        from .model_meta import write_meta

        write_meta(path, meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ak_model.save(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved Akida model to %s", path)
    return path


def load_akida(path: str | Path) -> akida.Model:
    """Load an Akida model file; ModelError if it is missing or not an Akida model."""
    import akida

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Akida model file {path} does not exist", "check the path")
    try:
        return akida.Model(str(path))
    except Exception as err:  # akida raises plain RuntimeError/ValueError on a bad file
        raise ModelError(
            f"{path} is not a readable Akida model: {err}",
            "pass a .fbz file written by save_akida / akida.Model.save",
        ) from err
