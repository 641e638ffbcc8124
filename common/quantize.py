"""Quantize a QANA model for its Akida target with quantizeml (calibration, 1-bit spikes, QAT)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tf_keras as keras

from common.errors import DataError, ModelError
from common.log import get_logger
from common.models import SPIKE_LAYER, VariantInfo, check_convertible, get_variant, spike_as_relu

log = get_logger("quantize")

#: Bitwidth of the spike generator's output on Akida 1.0 (the learnable layer needs 1-bit input).
SPIKE_BITS = 1


@contextlib.contextmanager
def akida_version(variant: str | VariantInfo) -> Iterator[None]:
    """Context manager selecting the variant's Akida version for quantizeml and cnn2snn.

    It must wrap both quantization and conversion (cnn2snn's default is Akida 2.0).
    """
    from cnn2snn import AkidaVersion, set_akida_version

    info = get_variant(variant)
    if info.akida_version is None:
        raise ModelError(
            f"variant {info.name!r} targets {info.target!r}, not an Akida version",
            "use a 'qana-akd1000' or 'qana-akida2' model",
        )
    with set_akida_version(getattr(AkidaVersion, info.akida_version)):
        yield


def quantization_params(variant: str | VariantInfo):
    """Return the quantizeml ``QuantizationParams`` of a variant (8/4/4 on Akida 1.0, 8-bit on 2.0).

    On Akida 1.0 activations are quantized **per-tensor**: an Akida 1.0 layer reads its input
    as one integer grid, but quantizeml's default per-axis ReLU outputs give every channel its
    own fractional bits, which cnn2snn converts without complaint (its per-axis check compares
    the wrong attribute) — the converted model then disagrees with the quantized one as soon
    as trained channels have different ranges. Akida 2.0 applies per-channel output scales in
    hardware, so it keeps quantizeml's per-axis default.
    """
    from quantizeml.layers import QuantizationParams

    info = get_variant(variant)
    return QuantizationParams(
        input_weight_bits=info.input_bits,
        weight_bits=info.weight_bits,
        activation_bits=info.activation_bits,
        per_tensor_activations=info.akida_version == "v1",
    )


def _spike_config() -> dict:
    """Return the quantizeml config making the spike generator emit unsigned 1-bit values."""
    return {
        "output_quantizer": {
            "bitwidth": SPIKE_BITS,
            "signed": False,
            "axis": "per-tensor",
            "buffer_bitwidth": 32,
        },
        "buffer_bitwidth": 32,
    }


def check_images(images: np.ndarray, model: keras.Model, what: str = "calibration") -> np.ndarray:
    """Validate raw 0–255 images against the model input; return them as float32.

    Raises
    ------
    DataError
        Wrong type/shape, or values that look rescaled to 0–1 (Akida needs raw pixels).
    """
    if not isinstance(images, np.ndarray):
        raise DataError(f"{what} images must be a numpy array, got {type(images).__name__}")
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise DataError(
            f"{what} images have shape {images.shape}; model {model.name!r} expects "
            f"(N, {', '.join(map(str, expected))}) with N >= 1",
            "resize the images to the model's input size",
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{what} images range over [{lo}, {hi}]", "pass raw 0–255 pixel values")
    if hi <= 1.0 and images.dtype != np.uint8:
        raise DataError(
            f"{what} images range over [{lo}, {hi}]: they look rescaled to 0–1",
            "pass raw 0–255 pixels; the model's first layer rescales them",
        )
    return images.astype(np.float32)


def quantize_model(
    model: keras.Model,
    variant: str | VariantInfo,
    calibration: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    epochs: int = 1,
) -> keras.Model:
    """Quantize and calibrate a float QANA model for its Akida target.

    Parameters
    ----------
    model : tf_keras.Model
        Float model from :func:`common.models.create_model`.
    variant : str | VariantInfo
        Its variant; decides bits (``quantization_params``) and the Akida version.
    calibration : np.ndarray | None (default: None)
        Raw 0–255 training images ``(N, H, W, 3)``. None calibrates on random images (only
        for tests: ranges will not fit real data).
    batch_size : int (default: 32)
        Calibration batch size (capped at N).
    epochs : int (default: 1)
        Calibration passes over the images.

    Returns
    -------
    tf_keras.Model
        The quantized model (float logits out through a final Dequantizer). On Akida 1.0 the
        spike generator ``head_spike`` (a :class:`~common.models.SpikeReLU`, quantized as
        ``ReLU(1.0)``) outputs 1-bit values and activations are per-tensor. Convert it with
        :func:`common.akida_exact.convert_exact` for a bit-exact Akida model.

    Raises
    ------
    ModelError
        When a layer cannot run on the target (checked before calling quantizeml), e.g. any
        ``qana-float`` model.
    DataError
        When the calibration images are malformed or not raw pixels.
    """
    from quantizeml.models import quantize

    info = get_variant(variant)
    check_convertible(model, info)
    model = spike_as_relu(model)
    q_config = {}
    if info.edge_learning:
        if SPIKE_LAYER not in {layer.name for layer in model.layers}:
            raise ModelError(
                f"model {model.name!r} for {info.name} has no {SPIKE_LAYER!r} layer",
                f"build it with create_model({info.name!r})",
            )
        q_config[SPIKE_LAYER] = _spike_config()
    kwargs: dict = {"epochs": epochs}
    if calibration is None:
        log.warning("quantizing %s with random calibration images: ranges will not fit data",
                    model.name)
        kwargs.update(num_samples=max(batch_size, 8), batch_size=batch_size)
    else:
        samples = check_images(calibration, model)
        kwargs.update(samples=samples, num_samples=len(samples),
                      batch_size=min(batch_size, len(samples)))
    with akida_version(info), _no_progress_bars():
        qmodel = quantize(model, q_config=q_config or None, qparams=quantization_params(info),
                          **kwargs)
    log.info("quantized %s for %s (%s-bit weights, %s-bit activations)", model.name, info.name,
             info.weight_bits, info.activation_bits)
    return qmodel


def qat_compile(qmodel: keras.Model, lr: float = 1e-5, loss: Any = None) -> keras.Model:
    """Compile a quantized model for quantization-aware training (an ordinary ``fit``).

    Parameters
    ----------
    qmodel : tf_keras.Model
        Output of :func:`quantize_model`.
    lr : float (default: 1e-5)
        Adam learning rate; use about a tenth of the float learning rate.
    loss : tf_keras.losses.Loss | None (default: None)
        Training loss; None is sparse categorical cross-entropy on logits.

    Returns
    -------
    tf_keras.Model
        The same model, compiled with ``loss``.
    """
    qmodel.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return qmodel


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep Keras' per-batch progress bars (quantizeml's calibration ``predict``) off stdout."""
    from tf_keras.utils import (
        disable_interactive_logging,
        enable_interactive_logging,
        is_interactive_logging_enabled,
    )

    was_on = is_interactive_logging_enabled()
    disable_interactive_logging()
    try:
        yield
    finally:
        if was_on:
            enable_interactive_logging()
