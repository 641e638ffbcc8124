"""Saliency-guided training: mask the least salient pixels, add KL(p(x) ‖ p(masked x)) to the loss.

Ismail et al., "Improving Deep Learning Interpretability by Saliency Guided Training" (NeurIPS
2021), as used with quantization-aware training by Lavaei et al. (arXiv 2512.17515). Per batch:

1. saliency ``s = Σ_channels |∂ logit_y(x) / ∂x|`` per pixel (y = the true label), treated as a
   constant (no second-order gradient);
2. the ``k`` fraction of pixels with the lowest saliency in each image get ``mask_value``
   (all channels of a pixel together, so masks stay pixel-aligned with saliency maps);
3. loss = ``CE(y, f(x)) + kl_weight · KL(softmax f(x) ‖ softmax f(x̃))`` averaged over the batch
   (weighted by sample weights when given), plus the model's own losses (e.g. PACT's α penalty).
   Gradients flow through both the original and the masked forward pass, as in the reference code.

It wraps float and quantized (quantizeml) Keras models alike: quantizeml quantizers pass
straight-through gradients, so input saliency is defined for both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from common.errors import ConfigError
from common.log import get_logger
from common.losses import LossWrapper

log = get_logger("sgt")

MASK_VALUES = ("mean", "random")


def check_sgt_options(mask_fraction: float, kl_weight: float, mask_value: str | float) -> None:
    """Validate SGT options at the boundary.

    Raises
    ------
    ConfigError
        ``mask_fraction`` outside (0, 1), negative ``kl_weight``, or an unknown ``mask_value``.
    """
    if not (isinstance(mask_fraction, (int, float)) and 0.0 < mask_fraction < 1.0):
        raise ConfigError(
            f"SGT mask_fraction={mask_fraction!r} is outside (0, 1)",
            "give the fraction of lowest-saliency pixels to mask, e.g. 0.1 for 10 %",
        )
    if not (np.isfinite(kl_weight) and kl_weight >= 0):
        raise ConfigError(f"SGT kl_weight={kl_weight!r} is not >= 0", "use e.g. 1.0")
    if isinstance(mask_value, str) and mask_value not in MASK_VALUES:
        raise ConfigError(
            f"SGT mask_value={mask_value!r} is unknown",
            f"use one of {', '.join(MASK_VALUES)} or a pixel value in 0–255",
        )
    if not isinstance(mask_value, str) and not 0.0 <= float(mask_value) <= 255.0:
        raise ConfigError(
            f"SGT mask_value={mask_value!r} is not a raw pixel value", "use a number in 0–255"
        )


def input_saliency(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-pixel saliency ``Σ_c |∂ logit_y / ∂x|`` of shape ``(N, H, W)`` (no gradient through it).

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized model returning logits ``(N, classes)``.
    x : tf.Tensor
        Raw 0–255 images ``(N, H, W, C)``, float32.
    y : tf.Tensor
        Integer labels ``(N,)`` selecting the logit.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.reshape(model(x, training=False), (tf.shape(x)[0], -1))
        picked = tf.gather(logits, tf.cast(y, tf.int32), axis=1, batch_dims=1)
    grads = tape.gradient(picked, x)
    return tf.stop_gradient(tf.reduce_sum(tf.abs(grads), axis=-1))


def mask_lowest(
    x: tf.Tensor,
    saliency: tf.Tensor,
    mask_fraction: float,
    mask_value: str | float = "mean",
) -> tf.Tensor:
    """Replace the ``mask_fraction`` lowest-saliency pixels of each image.

    Parameters
    ----------
    x : tf.Tensor
        Images ``(N, H, W, C)``.
    saliency : tf.Tensor
        Per-pixel saliency ``(N, H, W)``.
    mask_fraction : float
        Fraction of pixels to mask, in (0, 1); ``floor(k · H·W)`` pixels, at least 1.
    mask_value : str | float (default: "mean")
        ``"mean"``: each image's per-channel mean; ``"random"``: uniform 0–255 noise;
        a number: that pixel value.

    Returns
    -------
    tf.Tensor
        The masked images (ties in saliency are broken by pixel order, lowest index first).
    """
    n, h, w, c = (tf.shape(x)[i] for i in range(4))
    flat = tf.reshape(saliency, (n, h * w))
    count = tf.maximum(1, tf.cast(tf.floor(mask_fraction * tf.cast(h * w, tf.float32)), tf.int32))
    # top_k of -saliency = the lowest saliencies; sorted=True makes ties deterministic.
    _, lowest = tf.math.top_k(-flat, k=count, sorted=True)
    rows = tf.repeat(tf.range(n)[:, None], count, axis=1)
    indices = tf.stack([rows, lowest], axis=-1)
    mask = tf.scatter_nd(indices, tf.ones((n, count), x.dtype), (n, h * w))
    mask = tf.reshape(mask, (n, h, w, 1))
    if isinstance(mask_value, str) and mask_value == "mean":
        fill = tf.reduce_mean(x, axis=(1, 2), keepdims=True) * tf.ones_like(x)
    elif isinstance(mask_value, str):
        fill = tf.random.uniform(tf.shape(x), 0.0, 255.0, dtype=x.dtype)
    else:
        fill = tf.fill(tf.shape(x), tf.cast(mask_value, x.dtype))
    return x * (1.0 - mask) + fill * mask


def kl_divergence(logits_p: tf.Tensor, logits_q: tf.Tensor) -> tf.Tensor:
    """Per-sample ``KL(softmax(p) ‖ softmax(q))`` from logits, shape ``(N,)``."""
    log_p = tf.nn.log_softmax(logits_p, axis=-1)
    log_q = tf.nn.log_softmax(logits_q, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


class SaliencyGuidedModel(LossWrapper):
    """Wrap a model so that ``fit`` trains it with the saliency-guided loss.

    The wrapper shares the wrapped model's variables: training it trains ``model`` in place;
    save/convert ``model`` itself afterwards. ``compile`` only needs an optimizer (the label
    term is ``label_loss``, sparse categorical cross-entropy on logits by default); ``fit``
    reports ``loss``, ``ce`` (the label term) and ``kl``. Evaluation/prediction use the plain
    model.

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized model mapping raw 0–255 images to logits.
    mask_fraction : float (default: 0.1)
        Fraction of lowest-saliency pixels masked per image, in (0, 1).
    kl_weight : float (default: 1.0)
        Weight of the KL term.
    mask_value : str | float (default: "mean")
        See :func:`mask_lowest`.
    label_loss : tf_keras.losses.Loss | None (default: None)
        Per-sample label loss (``reduction=NONE``), e.g. the logit-adjusted one; None is
        sparse categorical cross-entropy on logits.

    Raises
    ------
    ConfigError
        On invalid options (:func:`check_sgt_options`).
    """

    def __init__(
        self,
        model: keras.Model,
        mask_fraction: float = 0.1,
        kl_weight: float = 1.0,
        mask_value: str | float = "mean",
        label_loss: keras.losses.Loss | None = None,
        **kwargs: Any,
    ) -> None:
        check_sgt_options(mask_fraction, kl_weight, mask_value)
        name = kwargs.pop("name", f"sgt_{model.name}")
        super().__init__(model, ("loss", "ce", "kl"), name=name, **kwargs)
        self.mask_fraction = float(mask_fraction)
        self.kl_weight = float(kl_weight)
        self.mask_value = mask_value
        self._ce = label_loss or keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=keras.losses.Reduction.NONE
        )

    def sgt_losses(
        self, x, y, sample_weight=None, training: bool = False
    ) -> dict[str, tf.Tensor]:
        """Return ``{"loss", "ce", "kl"}`` of one batch.

        ``loss = ce + kl_weight · kl + Σ model.losses``; ``ce`` and ``kl`` are
        (sample-weighted) batch means.
        """
        x = tf.cast(x, tf.float32)
        y = tf.reshape(tf.cast(y, tf.int32), (-1,))
        saliency = input_saliency(self.model, x, y)
        masked = mask_lowest(x, saliency, self.mask_fraction, self.mask_value)
        n = tf.shape(x)[0]
        logits = tf.reshape(self.model(x, training=training), (n, -1))
        logits_masked = tf.reshape(self.model(masked, training=training), (n, -1))
        ce = self._ce(y, logits)
        kl = kl_divergence(logits, logits_masked)
        if sample_weight is None:
            ce_mean, kl_mean = tf.reduce_mean(ce), tf.reduce_mean(kl)
        else:
            w = tf.reshape(tf.cast(sample_weight, tf.float32), (-1,))
            total_w = tf.maximum(tf.reduce_sum(w), 1e-12)
            ce_mean, kl_mean = tf.reduce_sum(w * ce) / total_w, tf.reduce_sum(w * kl) / total_w
        loss = ce_mean + self.kl_weight * kl_mean
        if self.model.losses:
            loss = loss + tf.add_n(self.model.losses)
        return {"loss": loss, "ce": ce_mean, "kl": kl_mean}

    def train_step(self, data):
        """One SGT step: saliency, masking, CE + KL, optimizer update."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            losses = self.sgt_losses(x, y, sample_weight, training=True)
        variables = self.model.trainable_variables
        grads = tape.gradient(losses["loss"], variables)
        self.optimizer.apply_gradients(
            (g, v) for g, v in zip(grads, variables, strict=True) if g is not None
        )
        return self._track(losses)

    def test_step(self, data):
        """Report the SGT losses on validation data (no update)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        losses = self.sgt_losses(x, y, sample_weight, training=False)
        return self._track(losses)


def sgt_fit(
    model: keras.Model,
    dataset: tf.data.Dataset,
    epochs: int,
    *,
    lr: float = 1e-3,
    mask_fraction: float = 0.1,
    kl_weight: float = 1.0,
    mask_value: str | float = "mean",
    optimizer: keras.optimizers.Optimizer | None = None,
    callbacks: list | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` in place with saliency-guided training (centralized or federated local).

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized model (logits out) — trained in place.
    dataset : tf.data.Dataset
        Batches of ``(images, labels)`` or ``(images, labels, sample_weights)``, raw 0–255
        pixels (e.g. :func:`common.augment.make_dataset`).
    epochs : int
        Passes over ``dataset`` (>= 1).
    lr : float (default: 1e-3)
        Adam learning rate (ignored when ``optimizer`` is given).
    mask_fraction, kl_weight, mask_value
        See :class:`SaliencyGuidedModel`.
    optimizer : tf_keras.optimizers.Optimizer | None (default: None)
        Optimizer to use instead of ``Adam(lr)``.
    callbacks : list | None (default: None)
        Keras callbacks passed to ``fit``.

    Returns
    -------
    dict[str, list[float]]
        Per-epoch ``loss``, ``ce`` and ``kl``.

    Raises
    ------
    ConfigError
        On invalid options or ``epochs < 1``.
    """
    if epochs < 1:
        raise ConfigError(f"SGT epochs={epochs} is below 1", "train for at least one epoch")
    wrapper = SaliencyGuidedModel(model, mask_fraction, kl_weight, mask_value)
    wrapper.compile(optimizer=optimizer or keras.optimizers.Adam(lr))
    history = wrapper.fit(dataset, epochs=epochs, verbose=0, callbacks=callbacks)
    log.info("SGT %d epochs: loss %.4f → %.4f (kl %.4f)", epochs, history.history["loss"][0],
             history.history["loss"][-1], history.history["kl"][-1])
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}
