"""Centralized QANA training: split, balance, float training, quantize, QAT, convert to Akida."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .dataset import LesionDataset
from .errors import ConfigError, DataError, ModelError
from .log import get_logger
from .metrics import classification_metrics, headline
from .tta import predict_classes, tta_logits

log = get_logger("train")

#: ``progress(stage, done, total)`` — stage is e.g. "float", "qat", "quality", "load".
Progress = Callable[[str, int, int], None]

BALANCE_METHODS = ("sampler", "smote", "oversample", "none")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of one centralized training run.

    Parameters
    ----------
    variant : str (default: "qana-akd1000")
        Registered model variant (``qanafed model list``).
    size : int (default: 64)
        Input side in pixels; must be allowed by the variant's target.
    width : float (default: 1.0)
        Channel multiplier of the variant's stage table.
    epochs : int (default: 50)
        Maximum float-training epochs (early stopping on validation balanced accuracy).
    qat_epochs : int (default: 5)
        Maximum quantization-aware training epochs (0 gives post-training quantization).
    batch_size : int (default: 32)
        Mini-batch size.
    lr : float (default: 1e-3)
        Adam learning rate of float training.
    lr_schedule : str (default: "cosine")
        "cosine" decays each stage's learning rate to zero over its epochs (per epoch);
        "constant" keeps it fixed.
    qat_lr : float | None (default: None)
        Adam learning rate of QAT; None means ``lr / 10``.
    balance : str (default: "sampler")
        Class balancing of the training split only: "sampler" (class-balanced batch
        sampling, no synthetic images, see ``sampling_power``), "smote", "oversample" or "none".
    sampling_power : float (default: 0.5)
        With ``balance="sampler"``: classes are drawn in proportion to ``n_c^(1-power)``
        (1 = every class equally often, 0.5 = square-root, 0 = natural).
    loss : str (default: "logit-adjusted")
        "ce" (cross-entropy) or "logit-adjusted" (cross-entropy on logits plus
        ``la_tau · log prior`` of the batches' class distribution; inference uses plain logits).
    la_tau : float (default: 1.0)
        Strength of the logit adjustment.
    colour : str (default: "none")
        Colour constancy of every image ("none", "shades-of-gray", "gray-world"); recorded
        beside the saved model and applied identically wherever the model is scored.
    distill : bool (default: False)
        Distil the trained float model into the quantized one during QAT.
    distill_temperature : float (default: 4.0)
        Softening temperature of distillation.
    distill_weight : float (default: 0.5)
        Weight of the distillation term against the label loss, in [0, 1].
    tta : int (default: 8)
        Test-time augmentation views (flips / 90° rotations) for the reported test scores.
    align_before_qat : bool (default: True)
        On Akida 1.0, move the quantized model's channels onto the power-of-two scales of
        the exact conversion before QAT (:func:`common.akida_exact.pow2_output_scales`).
    spike_margin : float (default: 0.0)
        Float training pushes the spike generator's inputs at least this far from its 0.5
        threshold (:class:`common.models.blocks.SpikeReLU`); 0 turns it off.
    class_weighted : bool (default: False)
        Weight the loss by inverse class frequency (of the balanced training split).
    augment : bool (default: True)
        Random flips, rotation, colour and scale jitter on training batches.
    val : float (default: 0.15)
        Validation fraction (model selection only).
    test : float (default: 0.15)
        Test fraction (reported, never used for selection).
    seed : int (default: 0)
        Seed of split, balancing, augmentation and initialisation.
    patience : int (default: 20)
        Epochs without validation improvement before stopping (the cosine schedule's
        low-learning-rate tail is where validation scores peak: a short patience cuts it off).
    calibration_samples : int (default: 256)
        Training images used to calibrate quantizer ranges.
    min_agreement : float (default: 0.9)
        Smallest Akida-vs-quantized top-1 agreement accepted before saving the Akida model.
    quality_filter : bool (default: True)
        Drop unreadable, tiny, too dark/bright or blurry images first.
    pact : bool (default: False)
        Train every bounded ReLU's clip α (PACT, :mod:`common.pact`) during float training,
        then bake the learned α into ``ReLU(max_value=α)`` before quantization, so α is the
        quantizer's activation range and the converted layer's bound. α is fixed during QAT.
    pact_alpha_init : float (default: 6.0)
        Initial α of every PACT clip (6 = QANA's ReLU6 bound); must be > 0.
    pact_l2 : float (default: 1e-4)
        L2 penalty ``pact_l2 · α²`` per clip, added to the training loss; >= 0.
    sgt : bool (default: False)
        Saliency-guided training (:mod:`common.sgt`) in float training and in QAT.
    sgt_mask_fraction : float (default: 0.1)
        Fraction of lowest-saliency pixels masked per image, in (0, 1).
    sgt_kl_weight : float (default: 1.0)
        Weight of the KL term between outputs on the original and the masked images; >= 0.
    """

    variant: str = "qana-akd1000"
    size: int = 64
    width: float = 1.0
    epochs: int = 50
    qat_epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    qat_lr: float | None = None
    balance: str = "sampler"
    sampling_power: float = 0.5
    loss: str = "logit-adjusted"
    la_tau: float = 1.0
    colour: str = "none"
    distill: bool = False
    distill_temperature: float = 4.0
    distill_weight: float = 0.5
    tta: int = 8
    spike_margin: float = 0.0
    align_before_qat: bool = True
    class_weighted: bool = False
    augment: bool = True
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    patience: int = 20
    calibration_samples: int = 256
    min_agreement: float = 0.9
    quality_filter: bool = True
    pact: bool = False
    pact_alpha_init: float = 6.0
    pact_l2: float = 1e-4
    sgt: bool = False
    sgt_mask_fraction: float = 0.1
    sgt_kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_METHODS:
            raise ConfigError(
                f"balance={self.balance!r} is not a balancing method",
                f"use one of {', '.join(BALANCE_METHODS)}",
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule={self.lr_schedule!r} is not a learning-rate schedule",
                f"use one of {', '.join(LR_SCHEDULES)}",
            )
        for name in ("epochs", "qat_epochs", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is negative", "use 0 or more")
        if self.epochs == 0 and self.qat_epochs == 0:
            log.warning("epochs=0 and qat_epochs=0: the model is quantized without training")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"batch_size={self.batch_size}, lr={self.lr}", "use batch_size >= 1 and lr > 0"
            )
        if not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(
                f"min_agreement={self.min_agreement} is outside (0, 1]", "use e.g. 0.9 or 0.99"
            )
        self._check_pact_sgt()
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Validate the loss, sampling, colour, distillation and TTA options."""
        from .balance import sampling_probs
        from .colour import check_colour
        from .losses import LOSSES, check_distillation
        from .models import get_variant
        from .tta import check_tta

        info = get_variant(self.variant)  # an unknown variant fails before any data is read
        if info.allowed_sizes and self.size not in info.allowed_sizes:
            raise ConfigError(
                f"size={self.size} is not an input size {info.name} can run",
                f"use one of {list(info.allowed_sizes)} (--size)",
            )

        if self.loss not in LOSSES:
            raise ConfigError(
                f"loss={self.loss!r} is not a training loss", f"use one of {', '.join(LOSSES)}"
            )
        if not (np.isfinite(self.la_tau) and self.la_tau >= 0):
            raise ConfigError(f"la_tau={self.la_tau} is not >= 0", "use e.g. 1.0 (0: plain CE)")
        sampling_probs(np.array([0]), self.sampling_power)
        check_colour(self.colour)
        check_distillation(self.distill_temperature, self.distill_weight)
        check_tta(self.tta)
        if self.distill and self.sgt:
            raise ConfigError(
                "distill and sgt are both on; each replaces the QAT training step",
                "choose one of --distill and --sgt",
            )

    def _check_pact_sgt(self) -> None:
        """Validate the PACT and SGT options (checked even when the method is off)."""
        if not (np.isfinite(self.pact_alpha_init) and self.pact_alpha_init > 0):
            raise ConfigError(
                f"pact_alpha_init={self.pact_alpha_init} is not a positive number",
                "start the PACT clips at a positive α, e.g. 6.0 (the ReLU6 bound)",
            )
        for name in ("pact_l2", "sgt_kl_weight"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value} is not >= 0", "use 0 (off) or e.g. 1e-4 / 1.0")
        if not 0.0 < self.sgt_mask_fraction < 1.0:
            raise ConfigError(
                f"sgt_mask_fraction={self.sgt_mask_fraction} is outside (0, 1)",
                "give the fraction of lowest-saliency pixels to mask, e.g. 0.1 for 10 %",
            )

    @property
    def effective_qat_lr(self) -> float:
        """The QAT learning rate actually used."""
        return self.qat_lr if self.qat_lr is not None else self.lr / 10


@dataclass
class SplitArrays:
    """Decoded uint8 images and labels of the three splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)
    test_lesions: np.ndarray | None = None
    test_groups: dict[str, np.ndarray] | None = None
    test_image_ids: np.ndarray | None = None


def prepare_arrays(
    ds: LesionDataset,
    cfg: TrainConfig,
    split_file: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[SplitArrays, Any]:
    """Filter, split by lesion, decode, and balance the training split only.

    Parameters
    ----------
    ds : LesionDataset
        Any loaded dataset.
    cfg : TrainConfig
        Run configuration (size, fractions, balancing, seed).
    split_file : str | Path | None (default: None)
        A saved split to reuse (``qanafed data split``); None makes a new seeded one.
    progress : Progress | None (default: None)
        Progress callback.

    Returns
    -------
    tuple[SplitArrays, Split]
        The arrays and the lesion-grouped split they came from.
    """
    from .balance import balance_train
    from .preprocess import load_arrays
    from .quality import QualityConfig, check_quality
    from .splits import Split, assert_no_lesion_leak, grouped_split

    info: dict[str, Any] = {"format": ds.format, "images_in": len(ds)}
    if cfg.quality_filter:
        # An image smaller than the model input would be upscaled: "too small" is relative to
        # the model, capped at the filter's default for large models.
        qcfg = QualityConfig(min_side=min(QualityConfig().min_side, cfg.size))
        report = check_quality(ds, qcfg, progress=_stage(progress, "quality"))
        dropped = report.summary()
        if len(report.kept) == 0:
            raise DataError(
                f"the quality filter dropped all {len(ds)} images "
                f"({ {k: v for k, v in dropped.items() if v} })",
                "check the data (see `qanafed data inspect`), or train with --no-quality-filter",
            )
        if len(report.kept) < len(ds):
            log.warning(
                "quality filter dropped %d of %d images: %s",
                len(ds) - len(report.kept),
                len(ds),
                {k: v for k, v in dropped.items() if v},
            )
        ds = ds.subset(report.kept)
        info["quality_dropped"] = dropped
    split = (
        Split.load(split_file, ds)
        if split_file is not None
        else grouped_split(ds, val=cfg.val, test=cfg.test, seed=cfg.seed)
    )
    assert_no_lesion_leak(ds, split)
    load = _stage(progress, "load")
    parts = {}
    for name in ("train", "val", "test"):
        idx = getattr(split, name)
        parts[name] = (
            load_arrays(ds, cfg.size, idx, progress=load, colour=cfg.colour),
            ds.labels[idx],
        )
    x_train, y_train = parts["train"]
    info["train_before_balance"] = int(len(y_train))
    if cfg.balance != "sampler":  # the sampler balances batches, not the arrays
        x_train, y_train = balance_train(x_train, y_train, cfg.balance, seed=cfg.seed)
    info["train_after_balance"] = int(len(y_train))
    info["split_counts"] = split.class_counts(ds)
    from .clinical import subgroups_from_metadata

    test_ds = ds.subset(split.test)
    info["lesions"] = int(len(np.unique(ds.lesion_ids)))
    arrays = SplitArrays(
        x_train, y_train, *parts["val"], *parts["test"], class_names=ds.class_names, info=info,
        test_lesions=test_ds.lesion_ids,
        test_groups=subgroups_from_metadata(test_ds.sites, test_ds.metadata),
        test_image_ids=test_ds.image_ids,
    )
    return arrays, split


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def training_loss(
    cfg: TrainConfig, y_train: np.ndarray, num_classes: int, per_sample: bool = False
) -> Any:
    """Return the label loss of ``cfg`` for batches drawn from ``y_train`` as ``cfg`` draws them."""
    from .balance import effective_prior
    from .losses import make_loss

    power = cfg.sampling_power if cfg.balance == "sampler" else 0.0
    return make_loss(
        cfg.loss, effective_prior(y_train, num_classes, power), cfg.la_tau, per_sample
    )


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base_lr`` at epoch 0 towards 0 at ``epochs`` (never exactly 0)."""
    import math

    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def fit_selecting_on_val(
    model: Any,
    arrays: SplitArrays,
    cfg: TrainConfig,
    epochs: int,
    stage: str,
    progress: Progress | None = None,
    *,
    trainer: Any = None,
) -> dict[str, Any]:
    """Train with early stopping on validation balanced accuracy; restore the best weights.

    The test split is never looked at here.

    Parameters
    ----------
    model : tf_keras.Model
        Compiled float or quantized model, trained in place.
    arrays : SplitArrays
        Training and validation images.
    cfg : TrainConfig
        Batch size, augmentation, class weighting, patience, schedule, seed.
    epochs : int
        Maximum epochs (0: no training).
    stage : str
        Stage name for logs and progress.
    progress : Progress | None (default: None)
        Progress callback.
    trainer : tf_keras.Model | None (default: None)
        A compiled model whose ``fit`` trains ``model``'s variables (e.g. a
        :class:`common.sgt.SaliencyGuidedModel` wrapping it); None fits ``model`` itself.
        Selection always scores and restores ``model``.

    Returns
    -------
    dict[str, Any]
        Per-epoch history (loss, validation balanced accuracy), best epoch and seconds.
    """
    import tf_keras as keras

    from .augment import make_dataset
    from .balance import class_weights, sampling_probs

    train = make_dataset(
        arrays.x_train,
        arrays.y_train,
        batch_size=cfg.batch_size,
        augment=cfg.augment,
        shuffle=True,
        seed=cfg.seed,
        sample_probs=(
            sampling_probs(arrays.y_train, cfg.sampling_power) if cfg.balance == "sampler" else None
        ),
    )
    weights = class_weights(arrays.y_train, len(arrays.class_names)) if cfg.class_weighted else None
    best = {"score": -1.0, "epoch": 0, "weights": model.get_weights()}
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()

    class _SelectOnVal(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            y_pred = predict_classes(model, arrays.x_val)
            score = classification_metrics(arrays.y_val, y_pred, arrays.class_names)[
                "balanced_accuracy"
            ]
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": float((logs or {}).get("loss", np.nan)),
                    "val_balanced_accuracy": score,
                }
            )
            log.info(
                "%s epoch %d/%d: loss %.4f, val balanced accuracy %.3f",
                stage,
                epoch + 1,
                epochs,
                history[-1]["loss"],
                score,
            )
            if score > best["score"]:
                best.update(score=score, epoch=epoch + 1, weights=model.get_weights())
            elif epoch + 1 - best["epoch"] >= cfg.patience:
                self.model.stop_training = True
            if progress is not None:
                progress(stage, epoch + 1, epochs)

    fitted = model if trainer is None else trainer
    callbacks: list[Any] = [_SelectOnVal()]
    if cfg.lr_schedule == "cosine" and epochs > 0:
        base_lr = float(keras.backend.get_value(fitted.optimizer.learning_rate))
        callbacks.insert(
            0,
            keras.callbacks.LearningRateScheduler(lambda epoch: cosine_lr(base_lr, epoch, epochs)),
        )
    if epochs > 0:
        fitted.fit(train, epochs=epochs, verbose=0, class_weight=weights, callbacks=callbacks)
        model.set_weights(best["weights"])
    return {
        "history": history,
        "best_epoch": best["epoch"],
        "best_val_balanced_accuracy": best["score"],
        "seconds": time.perf_counter() - t0,
    }


def _sgt_trainer(model: Any, cfg: TrainConfig, lr: float, y_train: np.ndarray) -> Any:
    """Return a compiled :class:`~common.sgt.SaliencyGuidedModel` training ``model``.

    Its label term is ``cfg``'s training loss (:func:`training_loss`), per sample.
    """
    import tf_keras as keras

    from .sgt import SaliencyGuidedModel

    label = training_loss(cfg, y_train, int(model.output_shape[-1]), per_sample=True)
    wrapper = SaliencyGuidedModel(model, cfg.sgt_mask_fraction, cfg.sgt_kl_weight,
                                  label_loss=label)
    wrapper.compile(optimizer=keras.optimizers.Adam(lr))
    return wrapper


def train_float(
    arrays: SplitArrays, cfg: TrainConfig, progress: Progress | None = None,
    stage: str = "float",
) -> tuple[Any, dict[str, Any]]:
    """Build and train the float model of ``cfg``: plain, with PACT clips and/or with SGT.

    With ``cfg.pact`` every bounded ReLU (except the spike generator) becomes a learnable
    clip during training and the learned α is then baked into ``ReLU(max_value=α)``
    (:func:`common.pact.bake_pact`), so the returned model is an ordinary QANA model whose
    bounds are the learned α. With ``cfg.sgt`` the loss is the saliency-guided one.

    Parameters
    ----------
    arrays : SplitArrays
        The split (validation selects the epoch; test is not looked at).
    cfg : TrainConfig
        Run configuration.
    progress : Progress | None (default: None)
        Progress callback, called with ``stage``.
    stage : str (default: "float")
        Stage name for progress and logs.

    Returns
    -------
    tuple[tf_keras.Model, dict[str, Any]]
        The trained (baked) float model and the record of :func:`fit_selecting_on_val`,
        plus ``pact_alphas`` (layer → learned α) when PACT was on.
    """
    import tf_keras as keras

    from .models import create_model
    from .pact import apply_pact, bake_pact, pact_alphas

    keras.utils.set_random_seed(cfg.seed)
    model = create_model(
        cfg.variant, input_size=cfg.size, num_classes=len(arrays.class_names), width=cfg.width
    )
    if cfg.pact:
        model = apply_pact(model, alpha_init=cfg.pact_alpha_init, l2=cfg.pact_l2)
    set_spike_margin(model, cfg.spike_margin)  # after PACT, whose clone makes new layers
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.lr),
        loss=training_loss(cfg, arrays.y_train, len(arrays.class_names)),
    )
    trainer = _sgt_trainer(model, cfg, cfg.lr, arrays.y_train) if cfg.sgt else None
    record = fit_selecting_on_val(model, arrays, cfg, cfg.epochs, stage, progress,
                                  trainer=trainer)
    alphas = pact_alphas(model)
    if alphas:
        record["pact_alphas"] = alphas
        model = bake_pact(model)
    return model, record


def set_spike_margin(model: Any, margin: float) -> None:
    """Set the threshold margin of ``model``'s spike generators (before it is traced)."""
    from .models.blocks import SpikeReLU

    if not (np.isfinite(margin) and 0.0 <= margin < 0.5):
        raise ConfigError(f"spike_margin={margin} is outside [0, 0.5)", "use e.g. 0.1 (0: off)")
    for layer in model.layers:
        if isinstance(layer, SpikeReLU):
            layer.margin = float(margin)


def quantize_and_qat(
    float_model: Any,
    arrays: SplitArrays,
    cfg: TrainConfig,
    progress: Progress | None = None,
    *,
    bits: int | None = None,
    stage: str = "qat",
) -> tuple[Any, dict[str, Any]]:
    """Quantize ``float_model`` (calibrated on training images), then QAT for ``cfg.qat_epochs``.

    QAT uses the saliency-guided loss when ``cfg.sgt`` (quantizeml's straight-through
    gradients give input saliency on quantized models). ``float_model`` is not changed.

    Parameters
    ----------
    float_model : tf_keras.Model
        Trained float model (from :func:`train_float`).
    arrays : SplitArrays
        The split; ``cfg.calibration_samples`` training images calibrate.
    cfg : TrainConfig
        Run configuration.
    progress : Progress | None (default: None)
        Progress callback, called with ``stage``.
    bits : int | None (default: None)
        Weight and activation bit width (input layer stays at the variant's); None keeps
        the variant's own (4 on Akida 1.0). See :func:`variant_with_bits`.
    stage : str (default: "qat")
        Stage name for progress and logs.

    Returns
    -------
    tuple[tf_keras.Model, dict[str, Any]]
        The quantized model and ``{"ptq_val_balanced_accuracy", "qat"?}``.
    """
    from .quantize import qat_compile, quantize_model

    rng = np.random.default_rng(cfg.seed)
    n_cal = min(cfg.calibration_samples, len(arrays.x_train))
    calibration = arrays.x_train[rng.choice(len(arrays.x_train), n_cal, replace=False)]
    info = variant_with_bits(cfg.variant, bits)
    qmodel = quantize_model(float_model, info, calibration)
    record: dict[str, Any] = {
        "ptq_val_balanced_accuracy": classification_metrics(
            arrays.y_val, predict_classes(qmodel, arrays.x_val), arrays.class_names
        )["balanced_accuracy"]
    }
    if cfg.align_before_qat and info.akida_version == "v1" and cfg.qat_epochs > 0:
        # The exact Akida 1.0 conversion moves every 4-bit channel onto a power-of-two
        # scale; done only at conversion it cost 8.5 validation points (bench/RESULTS.md,
        # "Where the 4-bit gap comes from"). Aligned first, QAT learns on the chip's grid
        # and the conversion's own alignment is then a small correction.
        from .akida_exact import pow2_output_scales

        pow2_output_scales(qmodel)
    if cfg.qat_epochs > 0:
        loss = training_loss(cfg, arrays.y_train, len(arrays.class_names))
        qat_compile(qmodel, cfg.effective_qat_lr, loss=loss)
        trainer = (
            _sgt_trainer(qmodel, cfg, cfg.effective_qat_lr, arrays.y_train) if cfg.sgt else None
        )
        if cfg.distill:
            import tf_keras as keras

            from .losses import DistillationModel

            trainer = DistillationModel(
                qmodel, float_model, cfg.distill_temperature, cfg.distill_weight
            )
            trainer.compile(optimizer=keras.optimizers.Adam(cfg.effective_qat_lr), loss=loss)
        record["qat"] = fit_selecting_on_val(qmodel, arrays, cfg, cfg.qat_epochs, stage,
                                             progress, trainer=trainer)
    return qmodel, record


def score_logits(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    class_names: tuple[str, ...],
    tta: int = 1,
    **clinical: Any,
) -> dict[str, Any]:
    """Clinical metrics of ``model`` (Keras or Akida) on ``x``, with ``tta`` views averaged.

    ``clinical`` goes to :func:`common.clinical.clinical_metrics` (``lesion_ids`` for the
    lesion bootstrap, ``subgroups``, ``seed`` ...). The result also says how the outputs
    were made (``tta``: views and milliseconds per image per view).
    """
    from .clinical import clinical_metrics, softmax

    logits, info = tta_logits(model, x, tta)
    result = clinical_metrics(y, softmax(logits), class_names, **clinical)
    result["tta"] = info
    return result


def variant_with_bits(variant: str, bits: int | None) -> Any:
    """Return the variant's ``VariantInfo`` with weights and activations at ``bits``.

    The input layer keeps the variant's input bits (8). ``bits=None`` returns the variant
    unchanged. Whether the target converts the result is not checked here: on Akida 1.0,
    weights of 1, 2 or 4 bits convert and 8 does not (cnn2snn refuses it).

    Raises
    ------
    ConfigError
        ``bits`` not an integer in 1..8.
    """
    import dataclasses

    from .models import get_variant

    info = get_variant(variant)
    if bits is None:
        return info
    if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= 8):
        raise ConfigError(f"bits={bits!r} is not a bit width", "use an integer in 1..8, e.g. 4")
    return dataclasses.replace(info, weight_bits=int(bits), activation_bits=int(bits))


def train_and_convert(
    arrays: SplitArrays, cfg: TrainConfig, progress: Progress | None = None
) -> dict[str, Any]:
    """Float training → quantization (calibrated on training images) → QAT → Akida conversion.

    PACT (``cfg.pact``) trains the clips in float and bakes them before quantization; SGT
    (``cfg.sgt``) uses the saliency-guided loss in float training and QAT.

    Returns
    -------
    dict[str, Any]
        ``float_model``, ``quantized_model``, ``akida_model``, ``parity`` and ``metrics``
        (float / quantized / akida on the test split) plus ``training`` histories.
    """
    from .akida_exact import convert_exact
    from .parity import check_parity

    model, float_record = train_float(arrays, cfg, progress)
    training: dict[str, Any] = {"float": float_record}
    qmodel, q_record = quantize_and_qat(model, arrays, cfg, progress)
    training.update(q_record)

    # On Akida 1.0 this releases ReLU clips at their range (PACT), re-aligns the quantized
    # weights to power-of-two scales (in place) and sets exact thresholds: the quantized model
    # is scored after it, and the Akida model reproduces it bit for bit.
    ak_model = convert_exact(qmodel, cfg.variant)
    parity = check_parity(qmodel, ak_model, arrays.x_test, min_agreement=cfg.min_agreement)
    metrics = {
        kind: score_logits(
            m, arrays.x_test, arrays.y_test, arrays.class_names, cfg.tta,
            lesion_ids=arrays.test_lesions, subgroups=arrays.test_groups, seed=cfg.seed,
        )
        for kind, m in (("float", model), ("quantized", qmodel), ("akida", ak_model))
    }
    for kind, m in metrics.items():
        log.info("test %-9s %s", kind, headline(m))
    return {
        "float_model": model,
        "quantized_model": qmodel,
        "akida_model": ak_model,
        "parity": parity,
        "metrics": metrics,
        "training": training,
    }


def write_run(
    out: str | Path, result: dict[str, Any], payload: dict[str, Any], split: Any = None
) -> Path:
    """Write a finished run into ``out`` atomically: a temporary sibling folder, then rename.

    Nothing half-written is left in ``out``; an existing ``out`` is replaced only once the new
    one is complete.

    Returns
    -------
    Path
        The output folder.
    """
    from quantizeml import save_model

    from .convert import save_akida
    from .model_card import write_model_card
    from .model_meta import model_meta

    out = Path(out)
    cfg = payload["config"]
    meta = model_meta(
        variant=payload["variant"],
        size=payload["size"],
        class_names=payload["class_names"],
        colour=cfg.get("colour", "none"),
        tta=cfg.get("tta", 1),
        akida_hash=payload.get("akida_hash"),
    )
    with atomic_dir(out) as tmp:
        save_akida(result["akida_model"], tmp / "model.fbz", meta=meta)
        save_model(result["quantized_model"], str(tmp / "quantized.h5"))
        result["float_model"].save(tmp / "float.h5")
        text = json.dumps(payload, indent=2, default=_json_default)
        (tmp / "metrics.json").write_text(text)
        write_model_card(tmp / "model_card.md", json.loads(text))
        if split is not None:
            split.save(tmp / "split.json")
    return out


def run_training(
    ds: LesionDataset,
    cfg: TrainConfig,
    out: str | Path,
    split_file: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train, quantize, convert and write ``out/{model.fbz,quantized.h5,float.h5,metrics.json}``.

    Raises
    ------
    ModelError
        When the Akida model disagrees with the quantized model below ``cfg.min_agreement``
        (nothing is written then).
    """
    t0 = time.perf_counter()
    arrays, split = prepare_arrays(ds, cfg, split_file, progress)
    result = train_and_convert(arrays, cfg, progress)
    parity = result["parity"]
    parity_json = parity.to_dict()
    if not parity.passed:
        raise ModelError(
            f"the Akida model agrees with the quantized model on only "
            f"{parity.top1_agreement:.1%} of {parity.n_images} test images "
            f"(< min_agreement {cfg.min_agreement:.0%}); nothing was written",
            "train longer/QAT more, or lower --min-agreement knowingly",
        )
    from .convert import model_hash

    payload = {
        "variant": cfg.variant,
        "size": cfg.size,
        "class_names": list(arrays.class_names),
        "config": asdict(cfg),
        "preprocessing": {"colour_constancy": cfg.colour, "size": cfg.size, "tta": cfg.tta},
        "tta": cfg.tta,
        "data": arrays.info,
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "training": result["training"],
        "parity": parity_json,
        "akida_hash": model_hash(result["akida_model"]),
        "seconds": time.perf_counter() - t0,
        **result["metrics"],
    }
    out_dir = write_run(out, result, payload, split)
    log.info("wrote %s", out_dir)
    return payload


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
