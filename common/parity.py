"""Compare a quantized Keras model with its Akida conversion: logits, top-1 and per layer.

What is compared
----------------
- Logits: the quantized Keras model (float logits through its final Dequantizer) against
  ``akida.Model.predict`` (dequantized outputs) on the same raw uint8 images.
- Per layer: for every Akida layer but the input quantizer and the last one, a copy of the
  Akida model truncated after that layer (``akida.Model(layers=...)``) is run with
  ``forward`` and its integer outputs are compared with the integer values of the quantized
  Keras tensor ending the same block (the Keras layer that shares the Akida layer's name,
  followed along its single-outbound chain: activation, pooling). Layers whose Keras output
  is not a fixed-point tensor (e.g. a QFloat with per-channel scales) or whose truncated Akida
  model cannot be built are listed with ``compared=False`` and the reason. The per-layer pass
  uses the first ``layer_images`` images (64 by default); top-1 and logits use all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import tf_keras as keras

from common.errors import DataError, ModelError
from common.log import get_logger

if TYPE_CHECKING:
    import akida

log = get_logger("parity")


@dataclass
class LayerParity:
    """Per-layer comparison of integer outputs."""

    name: str
    compared: bool
    mismatch_fraction: float | None = None
    note: str = ""


@dataclass
class ParityReport:
    """Agreement between a quantized Keras model and its Akida model on a batch of images."""

    n_images: int
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    min_agreement: float
    layers: list[LayerParity] = field(default_factory=list)
    #: How many of the images the per-layer comparison used (the first ones).
    n_layer_images: int = 0

    @property
    def passed(self) -> bool:
        """Whether top-1 agreement reaches ``min_agreement``."""
        return self.top1_agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``passed`` included)."""
        return {**asdict(self), "passed": self.passed}


def _keras_logits(qmodel: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    x = images.astype(np.float32)
    out = [np.asarray(qmodel(x[i : i + batch_size], training=False))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).reshape(len(x), -1)


def _block_end(qmodel: keras.Model, name: str, akida_names: set[str]) -> str | None:
    """Name of the Keras layer ending the block that starts at Keras layer ``name``."""
    try:
        layer = qmodel.get_layer(name)
    except ValueError:
        return None
    while True:
        nodes = layer.outbound_nodes
        if len(nodes) != 1:
            return layer.name
        nxt = nodes[0].outbound_layer
        if nxt.name in akida_names or type(nxt).__name__ in ("Dequantizer", "QuantizedAdd",
                                                              "QuantizedConcatenate"):
            return layer.name
        layer = nxt


def _int_values(tensor: Any) -> np.ndarray | None:
    """Integer values of a quantizeml FixedPoint tensor, None for anything else."""
    from quantizeml.tensors import FixedPoint

    if isinstance(tensor, FixedPoint):
        return np.asarray(tensor.values)
    return None


def _layer_parity(
    qmodel: keras.Model, ak_model: akida.Model, images: np.ndarray
) -> list[LayerParity]:
    import akida

    ak_layers = list(ak_model.layers)
    ak_names = {layer.name for layer in ak_layers}
    results: list[LayerParity] = []
    ends: dict[str, str] = {}
    for layer in ak_layers[1:-1]:
        end = _block_end(qmodel, layer.name, ak_names)
        if end is None:
            results.append(LayerParity(layer.name, False, note="no Keras layer of that name"))
        else:
            ends[layer.name] = end
    if not ends:
        return results
    probe = keras.Model(qmodel.input, [qmodel.get_layer(e).output for e in ends.values()])
    keras_out = probe(images.astype(np.float32), training=False)
    keras_out = keras_out if isinstance(keras_out, list | tuple) else [keras_out]
    by_name = dict(zip(ends, keras_out, strict=True))
    for i, layer in enumerate(ak_layers[:-1]):
        if layer.name not in by_name:
            continue
        kv = _int_values(by_name[layer.name])
        if kv is None:
            results.append(LayerParity(layer.name, False,
                                       note=f"Keras output of {ends[layer.name]!r} is not "
                                            "fixed-point"))
            continue
        try:
            sub = akida.Model(layers=ak_layers[: i + 1])
            av = np.asarray(sub.forward(images))
        except Exception as err:  # truncating a branched model may be refused by akida
            results.append(LayerParity(layer.name, False, note=f"akida sub-model: {err}"))
            continue
        if av.size != kv.size:
            results.append(LayerParity(layer.name, False,
                                       note=f"shapes differ: akida {av.shape}, keras {kv.shape}"))
            continue
        frac = float(np.mean(av.reshape(kv.shape) != kv))
        results.append(LayerParity(layer.name, True, frac))
    return results


def check_parity(
    qmodel: keras.Model,
    ak_model: akida.Model,
    images_uint8: np.ndarray,
    *,
    min_agreement: float = 0.99,
    strict: bool = False,
    per_layer: bool = True,
    layer_images: int | None = 64,
) -> ParityReport:
    """Measure how closely the Akida model reproduces the quantized Keras model.

    Parameters
    ----------
    qmodel : tf_keras.Model
        Quantized model (from :func:`common.quantize.quantize_model`).
    ak_model : akida.Model
        Its conversion (from :func:`common.convert.convert_model`), unmapped or software-mapped.
    images_uint8 : np.ndarray
        Raw ``uint8`` images ``(N, H, W, 3)``, 0–255 (what Akida consumes).
    min_agreement : float (default: 0.99)
        Top-1 agreement under which the report fails.
    strict : bool (default: False)
        Raise ModelError when the report fails.
    per_layer : bool (default: True)
        Also compare integer outputs layer by layer (slower: one truncated Akida model each).
    layer_images : int | None (default: 64)
        Compare layers on the first this many images only (None: all). The per-layer pass
        runs one truncated Akida model per layer and holds every Keras intermediate output,
        so on a large test split at 128 px it would cost more than the whole conversion.

    Returns
    -------
    ParityReport
        Top-1 agreement, max/mean |Δlogit| and per-layer mismatch fractions.

    Raises
    ------
    DataError
        Images that are not uint8 ``(N, H, W, 3)`` matching the model input.
    ModelError
        ``strict=True`` and agreement below ``min_agreement``.
    """
    images = np.asarray(images_uint8)
    expected = tuple(int(d) for d in ak_model.input_shape)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(
            f"parity images are {images.dtype} {images.shape}; Akida needs uint8 (N, "
            f"{', '.join(map(str, expected))}) raw 0–255 pixels",
            "pass the raw images (np.uint8), not rescaled floats",
        )
    k_logits = _keras_logits(qmodel, images)
    a_logits = np.asarray(ak_model.predict(images), dtype=np.float32).reshape(len(images), -1)
    diff = np.abs(k_logits - a_logits)
    layer_batch = images if layer_images is None else images[:layer_images]
    report = ParityReport(
        n_images=len(images),
        top1_agreement=float(np.mean(k_logits.argmax(1) == a_logits.argmax(1))),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        min_agreement=min_agreement,
        layers=_layer_parity(qmodel, ak_model, layer_batch) if per_layer else [],
        n_layer_images=len(layer_batch) if per_layer else 0,
    )
    log.info("parity on %d images: top-1 agreement %.4f, max |dlogit| %.4g",
             report.n_images, report.top1_agreement, report.max_abs_logit_diff)
    if strict and not report.passed:
        raise ModelError(
            f"Akida model agrees with the quantized model on {report.top1_agreement:.1%} of "
            f"{report.n_images} images, below min_agreement={min_agreement:.1%} "
            f"(max |Δlogit| {report.max_abs_logit_diff:.3g})",
            "run more QAT epochs, calibrate on more images, or lower min_agreement knowingly",
        )
    return report
