"""Training losses: logit-adjusted cross-entropy and float-teacher distillation for QAT."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from .errors import ConfigError

#: Accepted values of ``TrainConfig.loss``.
LOSSES: tuple[str, ...] = ("ce", "logit-adjusted")


@keras.saving.register_keras_serializable(package="qanafed")
class LogitAdjustedLoss(keras.losses.Loss):
    """Sparse cross-entropy on ``logits + tau · log(prior)`` (Menon et al., arXiv 2007.07314).

    Training with the training prior added to the logits makes the **plain** logits (used
    at inference, on the chip) estimate a class-balanced posterior: the balanced error is
    what gets minimised, without resampling pixels. ``prior`` is the class distribution the
    batches are drawn from (:func:`common.balance.effective_prior`).

    With ``adjustable=True`` the offset is a ``tf.Variable`` that :meth:`set_prior` changes
    after a train step was traced with this loss: a federated site's compiled step is shared by
    the simulated sites of one process, each with its own prior (:mod:`common.local_training`).

    Parameters
    ----------
    prior : Sequence[float]
        Training class prior, positive, summing to 1.
    tau : float (default: 1.0)
        Strength of the adjustment; 0 is plain cross-entropy.
    adjustable : bool (default: False)
        Hold the offset in a variable, for :meth:`set_prior`.
    """

    def __init__(
        self, prior: Any, tau: float = 1.0, name: str = "logit_adjusted",
        adjustable: bool = False, **kw: Any,
    ):
        super().__init__(name=name, **kw)
        offset = self._check(prior, tau)
        make = tf.Variable if adjustable else tf.constant
        kwargs = {"trainable": False} if adjustable else {}
        self._offset = make(offset, dtype=tf.float32, **kwargs)

    def _check(self, prior: Any, tau: float) -> np.ndarray:
        """Validate and keep ``prior`` and ``tau``; return the offset ``tau · log(prior)``."""
        prior = np.asarray(prior, dtype=np.float64)
        if prior.ndim != 1 or np.any(prior <= 0) or not np.isfinite(tau) or tau < 0:
            raise ConfigError(
                f"logit adjustment needs a positive class prior and tau >= 0, got prior "
                f"{np.round(prior, 4).tolist()} and tau {tau}",
                "train on data where every class has images, or use --loss ce",
            )
        self.prior = (prior / prior.sum()).tolist()
        self.tau = float(tau)
        return (self.tau * np.log(prior / prior.sum())).astype(np.float32)

    def set_prior(self, prior: Any, tau: float) -> None:
        """Set a new training prior and ``tau`` (``adjustable`` losses only).

        Raises
        ------
        ConfigError
            As the constructor, or if the loss is not adjustable or the class count differs.
        """
        offset = self._check(prior, tau)
        if not isinstance(self._offset, tf.Variable) or offset.shape != self._offset.shape:
            raise ConfigError(
                f"cannot set a prior of {offset.shape[0]} classes on this logit-adjusted loss "
                f"(offset {tuple(self._offset.shape)}, adjustable: "
                f"{isinstance(self._offset, tf.Variable)})",
                "build the loss with adjustable=True and the model's number of classes",
            )
        self._offset.assign(offset)

    @property
    def offset(self) -> np.ndarray:
        """The current ``tau · log(prior)`` added to the logits."""
        return np.asarray(self._offset)

    def call(self, y_true, y_pred):
        """Per-sample adjusted cross-entropy of integer labels and logits."""
        logits = tf.reshape(tf.cast(y_pred, tf.float32), (tf.shape(y_pred)[0], -1))
        y = tf.reshape(tf.cast(y_true, tf.int32), (-1,))
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits + self._offset)

    def get_config(self) -> dict[str, Any]:
        """Return the serialisable configuration."""
        return {**super().get_config(), "prior": self.prior, "tau": self.tau}


def make_loss(
    kind: str, prior: np.ndarray | None = None, tau: float = 1.0, per_sample: bool = False
) -> keras.losses.Loss:
    """Return the training loss named ``kind`` (see :data:`LOSSES`).

    ``per_sample`` returns one value per example (``reduction=NONE``), for trainers that
    combine it with other per-sample terms (:class:`common.sgt.SaliencyGuidedModel`).

    Raises
    ------
    ConfigError
        Unknown ``kind``.
    """
    reduction = {"reduction": keras.losses.Reduction.NONE} if per_sample else {}
    if kind == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **reduction)
    if kind == "logit-adjusted":
        return LogitAdjustedLoss(prior, tau, **reduction)
    raise ConfigError(f"loss {kind!r} is not a training loss", f"use one of {', '.join(LOSSES)}")


def distillation_kl(teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float):
    """Per-sample ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al. 2015), shape ``(N,)``.

    The ``T²`` factor keeps the soft term's gradients on the scale of the label loss.
    """
    t = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)


class LossWrapper(keras.Model):
    """Base of the models whose ``fit`` trains a wrapped model with a composite loss.

    It shares the wrapped model's variables, forwards ``call`` to it and reports one mean
    tracker per loss term (reset by Keras every epoch); subclasses write ``train_step``.

    Parameters
    ----------
    model : tf_keras.Model
        The model being trained (in place).
    terms : tuple[str, ...]
        Names of the reported loss terms, ``"loss"`` first.
    """

    def __init__(self, model: keras.Model, terms: tuple[str, ...], **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model
        self._trackers = {k: keras.metrics.Mean(name=k) for k in terms}

    def call(self, inputs, training=None):
        """Forward pass of the wrapped model."""
        return self.model(inputs, training=training)

    @property
    def metrics(self) -> list:
        """The loss trackers (reset by Keras every epoch)."""
        return list(self._trackers.values())

    def _track(self, losses: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Update the trackers with one batch's terms; return their running means."""
        for key, tracker in self._trackers.items():
            tracker.update_state(losses[key])
        return {k: t.result() for k, t in self._trackers.items()}


class DistillationModel(LossWrapper):
    """Train ``student`` on ``(1 - w) · label loss + w · T² · KL(teacher ‖ student)``.

    The teacher (the trained float model) runs in inference mode on the same augmented
    batch; only the student's variables change (in place: save/convert the student). Used
    in QAT so the 4-bit model imitates the float model's whole output distribution, not
    only its top-1 label. ``compile`` takes the optimizer and the label loss.

    Parameters
    ----------
    student : tf_keras.Model
        The model being trained (e.g. the quantized model).
    teacher : tf_keras.Model
        A frozen model with the same inputs and classes.
    temperature : float (default: 4.0)
        Softening temperature, > 0.
    weight : float (default: 0.5)
        Weight ``w`` of the distillation term, in [0, 1].
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        temperature: float = 4.0,
        weight: float = 0.5,
        **kw: Any,
    ) -> None:
        check_distillation(temperature, weight)
        name = kw.pop("name", f"distill_{student.name}")
        super().__init__(student, ("loss", "label", "kd"), name=name, **kw)
        self.student = student
        self.teacher = teacher
        self.temperature = float(temperature)
        self.weight = float(weight)

    def distill_losses(self, x, y, training: bool = False) -> dict[str, tf.Tensor]:
        """Return ``{"loss", "label", "kd"}`` of one batch (batch means)."""
        x = tf.cast(x, tf.float32)
        n = tf.shape(x)[0]
        student = tf.reshape(self.student(x, training=training), (n, -1))
        teacher = tf.stop_gradient(tf.reshape(self.teacher(x, training=False), (n, -1)))
        label = self.compiled_loss(y, student, regularization_losses=self.student.losses)
        kd = tf.reduce_mean(distillation_kl(teacher, student, self.temperature))
        loss = (1.0 - self.weight) * label + self.weight * kd
        return {"loss": loss, "label": label, "kd": kd}

    def train_step(self, data):
        """One step: student and teacher forward, combined loss, update of the student."""
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            losses = self.distill_losses(x, y, training=True)
        variables = self.student.trainable_variables
        grads = tape.gradient(losses["loss"], variables)
        self.optimizer.apply_gradients(
            (g, v) for g, v in zip(grads, variables, strict=True) if g is not None
        )
        return self._track(losses)


def check_distillation(temperature: float, weight: float) -> None:
    """Raise ConfigError unless ``temperature > 0`` and ``0 <= weight <= 1``."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"distillation temperature {temperature} is not positive",
            "use e.g. --distill-temperature 4",
        )
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(
            f"distillation weight {weight} is outside [0, 1]", "use e.g. --distill-weight 0.5"
        )
