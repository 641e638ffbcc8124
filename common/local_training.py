"""A site's local training: one model and one compiled train step per process, reused every round.

Building a quantized QANA model (quantizeml) and tracing its training graph cost far more than
a round of local training on a small site, so each process keeps one float and one quantized
model per scenario, with their Adam optimizer and ``tf.function`` train step. A round assigns
the global arrays, zeroes the optimizer state and sets the learning rate, the FedProx anchors
and the site's logit adjustment: every variable the step reads is reset, so a round gives the
same result in a fresh process as in one that already ran other rounds or other sites (tested
by resume).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .log import get_logger
from .weights import set_arrays

log = get_logger("site.training")

FLOAT = "float"
QUANTIZED = "quantized"


@dataclass
class LocalModel:
    """A model with its optimizer, FedProx anchors, label loss and compiled train step.

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized model; its variables are overwritten every round.
    optimizer : tf_keras.optimizers.Adam
        Built on the model's trainable variables; reset every round.
    anchors : list
        ``tf.Variable`` copies of the trainable weights at the round's start (FedProx).
    mu : Any
        ``tf.Variable`` holding the proximal weight.
    step : Callable
        Compiled ``step(x, y) -> label loss`` (one optimizer update).
    label_loss : LogitAdjustedLoss | None (default: None)
        The step's label loss, its offset a ``tf.Variable`` (:meth:`set_prior`); None for a
        model ending with a softmax (plain cross-entropy only).
    """

    model: Any
    optimizer: Any
    anchors: list
    mu: Any
    step: Callable
    label_loss: Any = None

    def start_round(self, arrays: dict[str, np.ndarray], lr: float, proximal_mu: float) -> None:
        """Load the global arrays; zero Adam's moments and step count; set lr, mu and anchors.

        The logit adjustment goes back to none (plain cross-entropy) until :meth:`set_prior`.
        """
        set_arrays(self.model, arrays)
        for var in self.optimizer.variables():
            var.assign(np.zeros(var.shape, dtype=var.dtype.as_numpy_dtype))
        self.optimizer.learning_rate = float(lr)
        self.mu.assign(float(proximal_mu))
        for anchor, weight in zip(self.anchors, self.model.trainable_weights, strict=True):
            anchor.assign(weight)
        self.set_prior(None, 0.0)

    def set_prior(self, prior: np.ndarray | None, tau: float) -> None:
        """Set the logit adjustment ``tau · log(prior)`` the step adds in its loss.

        Parameters
        ----------
        prior : np.ndarray | None
            The class prior of this site's training batches; None: uniform.
        tau : float
            Adjustment strength; 0 is plain cross-entropy.

        Raises
        ------
        ModelError
            ``tau > 0`` on a model that ends with a softmax (no logits to adjust).
        """
        if self.label_loss is None:
            if tau > 0:
                from .errors import ModelError

                raise ModelError(
                    f"model {self.model.name!r} ends with a softmax; logit adjustment needs logits",
                    "build the model without a final softmax, or set loss: ce",
                )
            return
        classes = int(self.model.output_shape[-1])
        self.label_loss.set_prior(np.full(classes, 1.0 / classes) if prior is None else prior,
                                  tau)


def from_logits(model) -> bool:
    """Whether the model outputs logits (no final softmax)."""
    import tf_keras as keras

    last = model.layers[-1]
    return getattr(last, "activation", None) is not keras.activations.softmax


@dataclass(frozen=True)
class SgtOptions:
    """Saliency-guided training options of the local step (see :mod:`common.sgt`).

    Parameters
    ----------
    mask_fraction : float (default: 0.1)
        Fraction of lowest-saliency pixels masked per image.
    kl_weight : float (default: 1.0)
        Weight of KL(p(x) ‖ p(masked x)).
    """

    mask_fraction: float = 0.1
    kl_weight: float = 1.0


def compile_local(model, sgt: SgtOptions | None = None) -> LocalModel:
    """Wrap ``model`` with an Adam optimizer and a ``tf.function`` train step.

    Loss: the label loss, a :class:`common.losses.LogitAdjustedLoss` whose offset is a
    variable (plain cross-entropy until :meth:`LocalModel.set_prior`; with ``sgt``, the
    saliency-guided loss of :meth:`common.sgt.SaliencyGuidedModel.sgt_losses`, label loss + KL
    on masked inputs), plus the model's own losses (e.g. PACT's α penalty), plus
    ``mu / 2 * ||w - w_anchor||²`` over the trainable weights (FedProx; zero when ``mu`` is 0).
    The step returns the label loss and is traced once per process, for any batch size: the
    prior and ``mu`` are variables read at each call, never constants of the trace, so the
    simulated sites sharing this step each train with their own.

    Raises
    ------
    ModelError
        With ``sgt``, if the model ends with a softmax (SGT needs logits).
    """
    import tensorflow as tf
    import tf_keras as keras

    from .losses import LogitAdjustedLoss

    label_loss = None
    if from_logits(model):
        classes = int(model.output_shape[-1])
        label_loss = LogitAdjustedLoss(np.full(classes, 1.0 / classes), tau=0.0, adjustable=True,
                                       reduction=keras.losses.Reduction.NONE)
        loss_fn = label_loss
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            reduction=keras.losses.Reduction.NONE)
    guided = None
    if sgt is not None:
        from .errors import ModelError
        from .sgt import SaliencyGuidedModel

        if label_loss is None:
            raise ModelError(f"model {model.name!r} ends with a softmax; SGT needs logits",
                             "build the model without a final softmax, or disable sgt")
        guided = SaliencyGuidedModel(model, sgt.mask_fraction, sgt.kl_weight,
                                     label_loss=label_loss)
    weights = model.trainable_weights
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.build(weights)
    anchors = [tf.Variable(w, trainable=False) for w in weights]
    mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    size = tuple(model.input_shape[1:])

    @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.float32),
                                  tf.TensorSpec((None,), tf.int32)])
    def step(x, y):
        with tf.GradientTape() as tape:
            if guided is not None:
                losses = guided.sgt_losses(x, y, training=True)  # includes model.losses
                loss, total = losses["ce"], losses["loss"]
            else:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
                total = loss + tf.add_n(model.losses) if model.losses else loss
            prox = tf.add_n([tf.reduce_sum(tf.square(w - a))
                             for w, a in zip(weights, anchors, strict=True)])
            total = total + (mu / 2.0) * prox
        grads = tape.gradient(total, weights)
        optimizer.apply_gradients(zip(grads, weights, strict=True))
        return loss

    return LocalModel(model, optimizer, anchors, mu, step, label_loss)


class ModelCache:
    """One :class:`LocalModel` per kind (``float``, ``quantized``) for the current scenario.

    A different scenario key (variant, size, width, classes ...) drops every cached model and
    clears the Keras session first, so a process never holds models of two scenarios. A
    different ``tag`` of one kind (e.g. the baked PACT α of the quantized model) rebuilds that
    kind only.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.models: dict[str, LocalModel] = {}
        self.tags: dict[str, Any] = {}

    def get(
        self, key: tuple, kind: str, build: Callable[[], Any], *, tag: Any = None,
        sgt: SgtOptions | None = None,
    ) -> LocalModel:
        """Return the cached model of ``kind`` for ``key`` and ``tag``, built with ``build()``.

        Parameters
        ----------
        key : tuple
            Scenario key; a new one clears the cache.
        kind : str
            ``float`` or ``quantized``.
        build : Callable[[], Any]
            Returns the uncompiled model.
        tag : Any (default: None)
            Anything else the model's structure depends on; a new tag rebuilds this kind.
        sgt : SgtOptions | None (default: None)
            Compile a saliency-guided step (part of the tag).
        """
        if key != self.key:
            self.clear()
            self.key = key
        tag = (tag, sgt)
        if kind not in self.models or self.tags.get(kind) != tag:
            log.info("building the %s model of this process", kind)
            self.models.pop(kind, None)
            self.models[kind] = compile_local(build(), sgt)
            self.tags[kind] = tag
        return self.models[kind]

    def clear(self) -> None:
        """Forget every cached model and free Keras' global state."""
        import tf_keras as keras

        self.tags.clear()
        if self.models:
            self.models.clear()
            keras.backend.clear_session()
            gc.collect()
        self.key = None


#: The process-wide cache used by :mod:`common.site`.
CACHE = ModelCache()


def train(
    local: LocalModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    augment: bool,
    seed: int,
    sample_probs: np.ndarray | None = None,
) -> float:
    """Run ``epochs`` seeded epochs of the compiled step; return the last epoch's mean loss.

    ``sample_probs`` (one per image, :func:`common.balance.sampling_probs`) draws each epoch's
    ``len(x)`` images with replacement from them instead of a permutation.
    """
    from .augment import make_dataset

    losses: list[float] = []
    for epoch in range(epochs):
        ds = make_dataset(x, y, batch_size=batch_size, augment=augment, shuffle=True,
                          seed=seed + epoch, sample_probs=sample_probs)
        losses = [float(local.step(xb, yb)) for xb, yb in ds]
    return float(np.mean(losses)) if losses else 0.0


def predict_logits(model, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of a Keras model on raw 0–255 images, in batches (no ``predict`` retracing)."""
    import tensorflow as tf

    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    out = [model(tf.constant(x[i:i + batch_size], tf.float32), training=False).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).reshape(len(x), -1)
