"""Saliency maps (vanilla gradients, SmoothGrad) of float and quantized models, overlays, stability.

All maps are computed on raw 0–255 inputs, the models' own input domain. Quantized (quantizeml)
models have straight-through gradients: measured on a 4-bit ``qana-akd1000``, input gradients are
finite and non-zero at every pixel, but coarser than the float model's (the quantized forward
pass is piecewise constant; the backward pass sees the float weights and the clip windows).
:func:`gradient_health` reports what a given model gives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from common.atomic import atomic_dir
from common.errors import ConfigError, DataError
from common.log import get_logger

log = get_logger("saliency")

METHODS = ("vanilla", "smoothgrad")


def check_images(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Return ``images`` as float32 after checking them against the model input.

    Raises
    ------
    DataError
        Not a 4-d array of the model's input size, or values outside 0–255.
    """
    images = np.asarray(images)
    expected = tuple(int(d) for d in model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise DataError(
            f"images have shape {images.shape}; model {model.name!r} expects "
            f"(N, {', '.join(map(str, expected))}), i.e. {expected[0]}×{expected[1]} RGB images",
            f"resize the images to {expected[0]}×{expected[1]} (common.preprocess.load_arrays)",
        )
    if images.size and (float(images.min()) < 0 or float(images.max()) > 255):
        raise DataError(
            f"images range over [{float(images.min())}, {float(images.max())}]",
            "pass raw 0–255 pixels; the model's first layer rescales them",
        )
    return images.astype(np.float32)


def predict_classes(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Top-1 class of each image (float or quantized Keras model)."""
    from .tta import predict_classes as top1

    return top1(model, check_images(model, images), batch_size)


def _gradients(model: keras.Model, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``∂ logit_target / ∂x`` of shape ``(N, H, W, C)``."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        logits = tf.reshape(model(xt, training=False), (len(x), -1))
        picked = tf.gather(logits, tf.constant(targets, tf.int32), axis=1, batch_dims=1)
    grads = tape.gradient(picked, xt)
    if grads is None:
        raise DataError(
            f"model {model.name!r} gives no gradient with respect to its input",
            "use a Keras float or quantizeml model (Akida models have no gradients)",
        )
    return grads.numpy()


def _targets(model: keras.Model, x: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    if targets is None:
        return predict_classes(model, x)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    classes = int(np.prod(model.output_shape[1:]))
    if len(targets) != len(x) or targets.min() < 0 or targets.max() >= classes:
        raise DataError(
            f"targets {targets.tolist()[:8]} do not give one class in 0..{classes - 1} for each "
            f"of the {len(x)} images",
            "pass one class index per image, or None for the predicted class",
        )
    return targets


def vanilla_gradients(
    model: keras.Model,
    images: np.ndarray,
    targets: np.ndarray | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Vanilla-gradient saliency ``max_c |∂ logit_target / ∂x_c|`` (Simonyan et al., 2014).

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized Keras model, raw 0–255 input, logits out.
    images : np.ndarray
        ``(N, H, W, 3)`` raw pixels of the model's input size.
    targets : np.ndarray | None (default: None)
        Class explained per image; None uses the model's own prediction.
    batch_size : int (default: 16)
        Images per gradient computation.

    Returns
    -------
    np.ndarray
        float32 ``(N, H, W)``.

    Raises
    ------
    DataError
        Wrong image size or range, bad targets.
    """
    x = check_images(model, images)
    t = _targets(model, x, targets)
    out = [
        np.abs(_gradients(model, x[i : i + batch_size], t[i : i + batch_size])).max(-1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def smoothgrad(
    model: keras.Model,
    images: np.ndarray,
    n: int = 16,
    sigma: float = 0.15 * 255,
    seed: int = 0,
    targets: np.ndarray | None = None,
) -> np.ndarray:
    """SmoothGrad (Smilkov et al., 2017): vanilla saliency averaged over ``n`` noisy copies.

    Noisy copies are clipped to 0–255 so that they stay in the models' input domain (a
    quantized model's input quantizer saturates outside it, with zero gradient).

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized Keras model.
    images : np.ndarray
        ``(N, H, W, 3)`` raw pixels.
    n : int (default: 16)
        Noisy samples per image (>= 1).
    sigma : float (default: 0.15·255)
        Gaussian noise standard deviation in pixel units (15 % of the range, as in the paper).
    seed : int (default: 0)
        Noise seed; the same seed gives the same noise for every model, so maps compare.
    targets : np.ndarray | None (default: None)
        Class explained per image; None uses the prediction on the clean image.

    Returns
    -------
    np.ndarray
        float32 ``(N, H, W)``.

    Raises
    ------
    ConfigError
        ``n < 1`` or ``sigma < 0``.
    DataError
        Wrong image size or range, bad targets.
    """
    if n < 1 or not sigma >= 0:
        raise ConfigError(f"smoothgrad n={n}, sigma={sigma}", "use n >= 1 and sigma >= 0")
    x = check_images(model, images)
    t = _targets(model, x, targets)
    rng = np.random.default_rng(seed)
    total = np.zeros(x.shape[:3], dtype=np.float64)
    for _ in range(n):
        noisy = np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 255.0).astype(np.float32)
        total += vanilla_gradients(model, noisy, t)
    return (total / n).astype(np.float32)


def gradient_health(sal: np.ndarray) -> dict[str, float | bool]:
    """``{"finite": all finite, "nonzero_fraction": share of non-zero pixels, "mean": ...}``."""
    sal = np.asarray(sal)
    return {
        "finite": bool(np.all(np.isfinite(sal))),
        "nonzero_fraction": float(np.mean(sal != 0)),
        "mean": float(np.mean(sal)),
    }


def compute(model: keras.Model, images: np.ndarray, method: str,
            targets: np.ndarray | None = None, **options: Any) -> np.ndarray:
    """Saliency maps by method name (``"vanilla"`` or ``"smoothgrad"``)."""
    if method == "vanilla":
        return vanilla_gradients(model, images, targets)
    if method == "smoothgrad":
        return smoothgrad(model, images, targets=targets, **options)
    raise ConfigError(f"saliency method {method!r} is unknown", f"use {', '.join(METHODS)}")


def _normalise(sal: np.ndarray) -> np.ndarray:
    """Scale a map to 0–1 by its 99th percentile (a few extreme pixels do not wash it out)."""
    hi = float(np.percentile(sal, 99))
    if hi <= 0:
        return np.zeros_like(sal, dtype=np.float32)
    return np.clip(sal / hi, 0.0, 1.0).astype(np.float32)


def overlay_png(
    image: np.ndarray, sal: np.ndarray, path: str | Path, alpha: float = 0.5,
    min_side: int = 192,
) -> Path:
    """Write the image with a heat overlay of its saliency map as a PNG.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` raw 0–255 pixels.
    sal : np.ndarray
        ``(H, W)`` saliency (any non-negative scale; normalised by its 99th percentile).
    path : str | Path
        Output file.
    alpha : float (default: 0.5)
        Opacity of the heat map where saliency is highest (it fades with saliency).
    min_side : int (default: 192)
        The PNG is upscaled (nearest neighbour, integer factor) to at least this side.

    Returns
    -------
    Path
        The written file.
    """
    from matplotlib import colormaps
    from PIL import Image

    image = np.asarray(image)
    sal = np.asarray(sal)
    if image.shape[:2] != sal.shape:
        raise DataError(
            f"image {image.shape} and saliency map {sal.shape} differ in size",
            "pass the map computed for this image",
        )
    heat = _normalise(sal)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]
    blended = (1 - weight) * image.astype(np.float32) + weight * colours
    out = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    factor = max(1, -(-min_side // max(image.shape[:2])))
    if factor > 1:
        out = out.resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG")
    return path


def _stats(values: list[float | None]) -> dict[str, float | None]:
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if defined.size == 0:
        return {"mean": None, "median": None}
    return {"mean": float(defined.mean()), "median": float(np.median(defined))}


def saliency_stability(
    sal_a: np.ndarray, sal_b: np.ndarray, top_k: float = 0.1
) -> dict[str, Any]:
    """Agreement of two sets of saliency maps of the same images (e.g. float vs quantized).

    Parameters
    ----------
    sal_a, sal_b : np.ndarray
        ``(N, H, W)`` maps.
    top_k : float (default: 0.1)
        Fraction of most salient pixels compared by the overlap score, in (0, 1].

    Returns
    -------
    dict[str, Any]
        ``spearman`` (per-image Spearman rank correlation of all pixels, scipy) and
        ``top_k_overlap`` (|top-k(a) ∩ top-k(b)| / k per image), each with ``mean``,
        ``median`` and ``per_image``; plus ``top_k`` and ``n_images``. A constant map has no
        rank correlation: its entry is None and it is left out of mean/median.

    Raises
    ------
    DataError
        Maps of different shapes or not 3-d.
    ConfigError
        ``top_k`` outside (0, 1].
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(sal_a, dtype=np.float64), np.asarray(sal_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise DataError(
            f"saliency maps of shapes {a.shape} and {b.shape} cannot be compared",
            "pass two (N, H, W) arrays computed on the same images",
        )
    if not 0 < top_k <= 1:
        raise ConfigError(f"top_k={top_k} is outside (0, 1]", "use e.g. 0.1 (10 % of pixels)")
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    k = max(1, int(round(top_k * flat_a.shape[1])))
    rho: list[float | None] = []
    overlap: list[float | None] = []
    for xa, xb in zip(flat_a, flat_b, strict=True):
        if np.ptp(xa) == 0 or np.ptp(xb) == 0:
            rho.append(None)
        else:
            rho.append(float(spearmanr(xa, xb).statistic))
        top_a = set(np.argsort(-xa, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-xb, kind="stable")[:k].tolist())
        overlap.append(len(top_a & top_b) / k)
    return {
        "spearman": {**_stats(rho), "per_image": rho},
        "top_k_overlap": {**_stats(overlap), "per_image": overlap},
        "top_k": top_k,
        "n_images": len(a),
    }


def saliency_in_lesion(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of one map's saliency mass that lies inside the lesion mask.

    Mass is the absolute saliency, so a signed map counts like its magnitude. 1.0: the model
    looks only at the lesion; the lesion's area fraction: no preference (a uniform map); lower:
    it looks at the skin around the lesion (rulers, hair, vignetting — a warning).

    Parameters
    ----------
    saliency : np.ndarray
        ``(H, W)`` saliency map.
    mask : np.ndarray
        ``(H, W)`` lesion mask (bool, or non-zero is lesion), aligned with the image.

    Returns
    -------
    float
        In [0, 1]; NaN when the map has no mass (all zero) or is not finite.

    Raises
    ------
    DataError
        Map and mask differ in shape or are not 2-d.
    """
    sal = np.abs(np.asarray(saliency, dtype=np.float64))
    inside = np.asarray(mask).astype(bool)
    if sal.ndim != 2 or sal.shape != inside.shape:
        raise DataError(
            f"saliency map {sal.shape} and mask {inside.shape} differ in shape or are not 2-d",
            "pass one (H, W) map and the mask loaded at the same size (common.masks.load_masks)",
        )
    total = float(sal.sum())
    if not (np.isfinite(total) and total > 0):
        return float("nan")
    return float(sal[inside].sum() / total)


def saliency_in_lesion_batch(
    saliency: np.ndarray, masks: np.ndarray, present: np.ndarray | None = None
) -> dict[str, Any]:
    """:func:`saliency_in_lesion` of each image, and their mean over images with a mask.

    Parameters
    ----------
    saliency : np.ndarray
        ``(N, H, W)`` maps.
    masks : np.ndarray
        ``(N, H, W)`` lesion masks.
    present : np.ndarray | None (default: None)
        bool ``(N,)``: which images have a mask (:func:`common.masks.load_masks`); None means
        all of them.

    Returns
    -------
    dict[str, Any]
        ``mean`` (None when no image counts), ``n`` (images counted), ``skipped_no_mask``,
        ``skipped_flat_map`` (maps with no saliency mass), ``lesion_area`` (mean mask area
        fraction of the counted images: what a map with no preference scores) and
        ``per_image`` (None where skipped).

    Raises
    ------
    DataError
        Shapes that do not match.
    """
    sal, m = np.asarray(saliency), np.asarray(masks).astype(bool)
    has = np.ones(len(sal), dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if sal.ndim != 3 or sal.shape != m.shape or has.shape != (len(sal),):
        raise DataError(
            f"saliency maps {sal.shape}, masks {m.shape} and present flags {has.shape} do not "
            "match",
            "pass (N, H, W) maps, (N, H, W) masks of the same images and size, and (N,) flags",
        )
    per_image: list[float | None] = []
    areas: list[float] = []
    flat = 0
    for s, mask, ok in zip(sal, m, has, strict=True):
        value = saliency_in_lesion(s, mask) if ok else float("nan")
        if ok and np.isnan(value):
            flat += 1
        if np.isnan(value):
            per_image.append(None)
        else:
            per_image.append(value)
            areas.append(float(mask.mean()))
    counted = [v for v in per_image if v is not None]
    return {
        "mean": float(np.mean(counted)) if counted else None,
        "n": len(counted),
        "skipped_no_mask": int((~has).sum()),
        "skipped_flat_map": flat,
        "lesion_area": float(np.mean(areas)) if areas else None,
        "per_image": per_image,
    }


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).strip("._") or "image"


def explain(
    float_model: keras.Model,
    qmodel: keras.Model,
    images: np.ndarray,
    image_ids: Sequence[str],
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    *,
    class_names: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    top_k: float = 0.1,
    smoothgrad_n: int = 16,
    seed: int = 0,
    masks: np.ndarray | None = None,
    mask_present: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write saliency overlays of a float and a quantized model and their stability summary.

    Both models explain the float model's predicted class, so their maps answer the same
    question. Files: ``out_dir/{method}/{image_id}_{float|quantized}.png`` and
    ``out_dir/summary.json``; ``out_dir`` is written atomically (temporary sibling, rename)
    and replaced if it exists.

    Parameters
    ----------
    float_model, qmodel : tf_keras.Model
        The float model and its quantized version (same input size and classes).
    images : np.ndarray
        ``(N, H, W, 3)`` raw pixels of the models' input size.
    image_ids : Sequence[str]
        One id per image (file names; characters outside ``[A-Za-z0-9._-]`` become ``_``).
    out_dir : str | Path
        Output folder.
    methods : Sequence[str] (default: ("vanilla", "smoothgrad"))
        Saliency methods.
    class_names : Sequence[str] | None (default: None)
        Names for the predicted classes in the summary.
    labels : np.ndarray | None (default: None)
        True labels, recorded in the summary when given.
    top_k : float (default: 0.1)
        Top-k fraction of :func:`saliency_stability`.
    smoothgrad_n : int (default: 16)
        Noisy samples of SmoothGrad.
    seed : int (default: 0)
        SmoothGrad noise seed (the same noise for both models).
    masks : np.ndarray | None (default: None)
        bool ``(N, H, W)`` lesion masks at the images' size (:func:`common.masks.load_masks`);
        when given and at least one is present, the summary gains ``saliency_in_lesion``.
    mask_present : np.ndarray | None (default: None)
        bool ``(N,)``: which images have a mask; None means all of ``masks``.

    Returns
    -------
    dict[str, Any]
        The summary written to ``summary.json``. With masks, ``saliency_in_lesion`` holds per
        method and model (``float``, ``quantized``) the :func:`saliency_in_lesion_batch` scores
        without ``per_image`` (those are in ``images`` as ``{method}_in_lesion_{model}``).

    Raises
    ------
    DataError
        Wrong image size or range, or ids not matching the images.
    ConfigError
        Unknown method.
    """
    x = check_images(float_model, images)
    check_images(qmodel, images)
    ids = [str(i) for i in image_ids]
    if len(ids) != len(x):
        raise DataError(f"{len(ids)} image ids for {len(x)} images", "give one id per image")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"saliency methods {list(methods)!r}", f"use {', '.join(METHODS)}")
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != x.shape[:3]:
            raise DataError(
                f"masks have shape {masks.shape}; the {len(x)} images need {x.shape[:3]}",
                f"load the masks of these images at size {x.shape[1]} (common.masks.load_masks)",
            )
        present = np.ones(len(x), bool) if mask_present is None else np.asarray(mask_present)
        if not present.any():
            masks = None
    names = [_safe_name(i) for i in ids]
    if len(set(names)) != len(names):
        names = [f"{k:03d}_{n}" for k, n in enumerate(names)]
    float_pred = predict_classes(float_model, x)
    q_pred = predict_classes(qmodel, x)

    def label(c: int) -> str | int:
        return class_names[c] if class_names is not None else int(c)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        summary: dict[str, Any] = {
            "n_images": len(x),
            "size": int(x.shape[1]),
            "methods": list(methods),
            "target": "float model's predicted class",
            "top1_agreement": float(np.mean(float_pred == q_pred)),
            "stability": {},
            "gradients": {},
        }
        per_method: dict[str, dict[str, Any]] = {}
        in_lesion: dict[str, dict[str, dict[str, Any]]] = {}
        for method in methods:
            options = {"n": smoothgrad_n, "seed": seed} if method == "smoothgrad" else {}
            maps = {
                "float": compute(float_model, x, method, float_pred, **options),
                "quantized": compute(qmodel, x, method, float_pred, **options),
            }
            for kind, sal in maps.items():
                for name, img, s in zip(names, x, sal, strict=True):
                    overlay_png(img, s, tmp / method / f"{name}_{kind}.png")
            summary["gradients"][method] = {k: gradient_health(s) for k, s in maps.items()}
            if masks is not None:
                in_lesion[method] = {
                    kind: saliency_in_lesion_batch(sal, masks, present)
                    for kind, sal in maps.items()
                }
            per_method[method] = saliency_stability(maps["float"], maps["quantized"], top_k)
            summary["stability"][method] = {
                key: {"mean": per_method[method][key]["mean"],
                      "median": per_method[method][key]["median"]}
                for key in ("spearman", "top_k_overlap")
            } | {"top_k": top_k}
            log.info("%s: float→quantized Spearman %s, top-%d%% overlap %s", method,
                     per_method[method]["spearman"]["mean"], round(100 * top_k),
                     per_method[method]["top_k_overlap"]["mean"])
        if masks is not None:
            summary["saliency_in_lesion"] = {
                method: {kind: {k: v for k, v in scores.items() if k != "per_image"}
                         for kind, scores in by_kind.items()}
                for method, by_kind in in_lesion.items()
            }
        summary["images"] = [
            {
                "image_id": ids[i],
                "file_stem": names[i],
                **({"label": label(int(labels[i]))} if labels is not None else {}),
                "float_pred": label(int(float_pred[i])),
                "quantized_pred": label(int(q_pred[i])),
                **{
                    f"{method}_{key}": per_method[method][key]["per_image"][i]
                    for method in methods
                    for key in ("spearman", "top_k_overlap")
                },
                **{
                    f"{method}_in_lesion_{kind}": scores["per_image"][i]
                    for method, by_kind in in_lesion.items()
                    for kind, scores in by_kind.items()
                },
            }
            for i in range(len(x))
        ]
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %d overlays and summary.json to %s", 2 * len(x) * len(methods), out_dir)
    return summary
