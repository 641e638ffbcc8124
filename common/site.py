"""What a site does in each phase: arrays and local data in, arrays and metrics out.

Nothing here knows Flower. The ClientApp unpacks a message, calls one of :func:`hello`,
:func:`warmup`, :func:`calibrate`, :func:`qat`, :func:`finalize`, and seals the metrics.
Images and per-image results never leave these functions; only named weight arrays, the
number of training examples and aggregate metrics do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .aggregate import EXCHANGED
from .errors import DataError
from .fedconfig import FedConfig
from .log import get_logger
from .weights import get_arrays, set_arrays

log = get_logger("site")

#: Local training runs eagerly up to this many batches (graph tracing is slower for fewer).
EAGER_MAX_BATCHES = 40


@dataclass(frozen=True)
class SiteData:
    """One site's local data, resized to the model's input, split by lesion into train and test.

    Parameters
    ----------
    site_id : str
        The site's name.
    class_names : tuple[str, ...]
        Class vocabulary (label order).
    x_train, y_train : np.ndarray
        Training images (uint8 ``(N, S, S, 3)``) and labels.
    x_test, y_test : np.ndarray
        Held-out images and labels (other lesions than the training ones).
    """

    site_id: str
    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def site_seed(seed: int, step: int, site_id: str) -> int:
    """Deterministic seed of one site's work in one round: a hash of (run seed, round, site)."""
    digest = hashlib.sha256(f"{seed}|{step}|{site_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _lesion_split(ds, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices by lesion id, so images of one lesion never land on both sides."""
    from .splits import grouped_split

    split = grouped_split(ds, val=0.0, test=test_fraction, seed=seed)
    return np.sort(np.concatenate([split.train, split.val])), np.asarray(split.test)


@lru_cache(maxsize=4)
def load_site_data(
    data: str,
    size: int,
    partition_id: int | None,
    scheme: str,
    num_sites: int,
    alpha: float,
    seed: int,
    test_fraction: float,
    site_id: str | None = None,
) -> SiteData:
    """Load (once per process) this site's data.

    Parameters
    ----------
    data : str
        Data set path or spec.
    size : int
        Model input side.
    partition_id : int | None
        Simulation: which partition of ``data`` is this site's. None: all of ``data`` (a real
        site's own folder).
    scheme, num_sites, alpha, seed
        Partition settings (simulation only); ``seed`` also seeds the train/test split.
    test_fraction : float
        Fraction of lesions held out for local testing.
    site_id : str | None (default: None)
        The site's name; defaults to the partition's name.

    Raises
    ------
    DataError
        If the partition is empty or too small to split.
    """
    from .loaders import load_dataset
    from .preprocess import load_arrays

    ds = load_dataset(data)
    name = site_id
    if partition_id is not None:
        from .partition import partition

        parts = partition(ds, scheme, num_sites, alpha, seed)
        keys = sorted(parts)
        if partition_id >= len(keys):
            raise DataError(
                f"partition-id {partition_id} but {data!r} split {scheme} gives {len(keys)} sites",
                "run as many SuperNodes as partition.sites",
            )
        name = name or str(keys[partition_id])
        ds = ds.subset(parts[keys[partition_id]])
    if len(ds) < 4:
        raise DataError(f"site {name!r} has only {len(ds)} images", "give every site more data")
    train_idx, test_idx = _lesion_split(ds, test_fraction, seed)
    x = load_arrays(ds, size)
    return SiteData(
        site_id=name or "site",
        class_names=tuple(ds.class_names),
        x_train=x[train_idx],
        y_train=np.asarray(ds.labels)[train_idx],
        x_test=x[test_idx],
        y_test=np.asarray(ds.labels)[test_idx],
    )


def data_of(cfg: FedConfig, partition_id: int | None, site_id: str | None) -> SiteData:
    """Return the site's data for a scenario (cached per process)."""
    p = cfg.partition
    return load_site_data(cfg.data, cfg.model.size, partition_id, p.scheme, p.sites, p.alpha,
                          p.seed, cfg.test_fraction, site_id)


# -- models ---------------------------------------------------------------------------------------
def build_float_model(cfg: FedConfig, num_classes: int):
    """Build the scenario's float model (fresh weights)."""
    from .models import create_model

    return create_model(cfg.model.variant, input_size=cfg.model.size, num_classes=num_classes,
                        width=cfg.model.width, depth=cfg.model.depth, seed=cfg.seed)


def _quantize(cfg: FedConfig, model, samples: np.ndarray):
    from .quantize import quantize_model

    return quantize_model(model, cfg.model.variant, samples.astype(np.float32))


def _structure_samples(cfg: FedConfig) -> np.ndarray:
    """Return a few fixed images to build a quantized model's structure (ranges are overwritten)."""
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (4, cfg.model.size, cfg.model.size, 3)).astype(np.float32)


def float_model_from(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Build the float model with the given (global) arrays."""
    model = build_float_model(cfg, num_classes)
    set_arrays(model, arrays)
    return model


def quantized_model_from(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Rebuild the global quantized model exactly from its arrays (weights and quantizer state)."""
    qmodel = _quantize(cfg, build_float_model(cfg, num_classes), _structure_samples(cfg))
    set_arrays(qmodel, arrays)
    return qmodel


def quantized_from_ranges(
    cfg: FedConfig, num_classes: int, float_arrays: dict[str, np.ndarray], ranges: dict
):
    """Server side of calibration: quantize the global float model and set the combined ranges."""
    from .aggregate import apply_ranges

    qmodel = _quantize(cfg, float_model_from(cfg, num_classes, float_arrays),
                       _structure_samples(cfg))
    apply_ranges(qmodel, ranges)
    return qmodel


def akida_from_arrays(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Convert the global quantized model to Akida; return ``(akida_model, hash)``.

    Returns ``(None, None)`` for the float reference variant, which does not convert.
    """
    if cfg.model.variant == "qana-float":
        return None, None
    from .convert import convert_model, model_hash

    akida_model = convert_model(quantized_model_from(cfg, num_classes, arrays), cfg.model.variant)
    return akida_model, model_hash(akida_model)


# -- training and evaluation ----------------------------------------------------------------------
def _prepare(seed: int) -> None:
    import tf_keras as keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)


def _train_arrays(data: SiteData, cfg: FedConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if cfg.balance == "none":
        return data.x_train, data.y_train
    from .balance import balance_train

    return balance_train(data.x_train, data.y_train, cfg.balance, seed=seed)


def _loss_fn(model):
    import tf_keras as keras

    last = model.layers[-1]
    from_logits = getattr(last, "activation", None) is not keras.activations.softmax
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def train_local(
    model,
    data: SiteData,
    cfg: FedConfig,
    lr: float,
    epochs: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place on the site's training split, deterministically.

    Loss: cross-entropy, plus ``proximal_mu / 2 * ||w - w_global||²`` over the trainable
    weights when ``proximal_mu > 0`` (FedProx; ``w_global`` = the weights at entry).

    Returns
    -------
    dict[str, float]
        ``train_loss`` (mean over the last epoch) and ``train_examples``.
    """
    import tensorflow as tf
    import tf_keras as keras

    from .augment import make_dataset

    x, y = _train_arrays(data, cfg, seed)
    loss_fn = _loss_fn(model)
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    anchors = [tf.constant(w.numpy()) for w in model.trainable_weights]

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
            if proximal_mu > 0:
                prox = tf.add_n([tf.reduce_sum(tf.square(w - a))
                                 for w, a in zip(model.trainable_weights, anchors, strict=True)])
                loss = loss + (proximal_mu / 2.0) * prox
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        return loss

    # Tracing a quantized model's training graph costs more than a few eager batches.
    batches = epochs * -(-len(x) // cfg.batch_size)
    if batches > EAGER_MAX_BATCHES:
        step = tf.function(step)
    losses: list[float] = []
    for epoch in range(epochs):
        ds = make_dataset(x, y, batch_size=cfg.batch_size, augment=cfg.augment, shuffle=True,
                          seed=seed + epoch)
        losses = [float(step(xb, yb)) for xb, yb in ds]
    return {"train_loss": float(np.mean(losses)) if losses else 0.0,
            "train_examples": int(len(x))}


def evaluate(model, x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Loss and classification metrics of a Keras model on local images (aggregates only)."""
    from .metrics import classification_metrics

    logits = model.predict(x.astype(np.float32), batch_size=64, verbose=0)
    loss = float(_loss_fn(model)(y, logits).numpy())
    metrics = classification_metrics(y, np.argmax(logits, axis=-1), class_names)
    metrics["loss"] = loss
    return metrics


# -- phases ---------------------------------------------------------------------------------------
def hello(data: SiteData) -> tuple[int, dict[str, Any]]:
    """Introduce the site: example weight and (sealed) data summary."""
    counts = np.bincount(data.y_train, minlength=len(data.class_names)).tolist()
    return len(data.y_train), {
        "class_names": list(data.class_names),
        "train_examples": int(len(data.y_train)),
        "test_examples": int(len(data.y_test)),
        "train_class_counts": counts,
    }


def _round(
    cfg: FedConfig, data: SiteData, model, step: int, lr: float, epochs: int, mu: float
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    seed = site_seed(cfg.seed, step, data.site_id)
    train = train_local(model, data, cfg, lr=lr, epochs=epochs, seed=seed, proximal_mu=mu)
    metrics = {**train, "test": evaluate(model, data.x_test, data.y_test, data.class_names)}
    return get_arrays(model, EXCHANGED["warmup"]), train["train_examples"], metrics


def warmup(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int,
    lr: float, epochs: int, proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """One float warm-up round: start from the global float arrays, train locally, evaluate."""
    _prepare(site_seed(cfg.seed, step, data.site_id))
    model = float_model_from(cfg, len(data.class_names), arrays)
    return _round(cfg, data, model, step, lr, epochs, proximal_mu)


def calibrate(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """Calibrate the global float model's quantizers on local training images."""
    seed = site_seed(cfg.seed, step, data.site_id)
    _prepare(seed)
    rng = np.random.default_rng(seed)
    n = min(cfg.calibration_samples, len(data.x_train))
    idx = np.sort(rng.choice(len(data.x_train), size=n, replace=False))
    qmodel = _quantize(cfg, float_model_from(cfg, len(data.class_names), arrays),
                       data.x_train[idx])
    state = get_arrays(qmodel, EXCHANGED["calibrate"])
    return state, n, {"calibration_examples": int(n), "quantizers": len(state)}


def qat(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int,
    lr: float, epochs: int, proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """One QAT round on the global quantized model; quantizer state is sent but never returned."""
    _prepare(site_seed(cfg.seed, step, data.site_id))
    qmodel = quantized_model_from(cfg, len(data.class_names), arrays)
    out, n, metrics = _round(cfg, data, qmodel, step, lr, epochs, proximal_mu)
    return {k: v for k, v in out.items() if k in set(get_arrays(qmodel, EXCHANGED["qat"]))}, n, \
        metrics


def finalize(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int, server_hash: str
) -> tuple[int, dict[str, Any]]:
    """Convert the global model to Akida, evaluate, learn on-chip, evaluate again."""
    from .metrics import classification_metrics

    seed = site_seed(cfg.seed, step, data.site_id)
    _prepare(seed)
    num_classes = len(data.class_names)
    if cfg.model.variant == "qana-float":
        model = float_model_from(cfg, num_classes, arrays)
        return len(data.y_train), {"test": evaluate(model, data.x_test, data.y_test,
                                                    data.class_names)}
    qmodel = quantized_model_from(cfg, num_classes, arrays)
    keras_q = evaluate(qmodel, data.x_test, data.y_test, data.class_names)
    akida_model, digest = akida_from_arrays(cfg, num_classes, arrays)
    from .train import predict_akida

    pred = predict_akida(akida_model, data.x_test.astype(np.uint8))
    report: dict[str, Any] = {
        "akida_hash": digest,
        "hash_matches_server": digest == server_hash,
        "keras_quantized": keras_q,
        "akida": classification_metrics(data.y_test, pred, data.class_names),
        "akida_after_edge": None,
    }
    if cfg.model.variant == "qana-akd1000":
        from .errors import QanafedError

        try:
            report["akida_after_edge"] = _edge_learning(cfg, data, akida_model, seed)
        except QanafedError as err:  # e.g. an undertrained backbone emits no spikes
            log.warning("site %s: on-chip learning skipped: %s", data.site_id, err.problem)
            report["akida_after_edge"] = {"error": err.problem}
    return len(data.y_train), report


def _edge_learning(cfg: FedConfig, data: SiteData, akida_model, seed: int) -> dict[str, Any]:
    """Learn on-chip from ``edge.shots`` local training images per class; score on local test."""
    from . import edge
    from .metrics import classification_metrics

    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(data.class_names)):
        idx = np.flatnonzero(data.y_train == c)
        if len(idx):
            picks.extend(rng.choice(idx, size=min(cfg.edge.shots, len(idx)), replace=False))
    picks = np.sort(np.asarray(picks, dtype=np.int64))
    shots = data.x_train[picks].astype(np.uint8)
    learner = edge.prepare_edge_learning(
        akida_model, len(data.class_names), shots, neurons_per_class=cfg.edge.neurons_per_class
    )
    edge.learn(learner, shots, data.y_train[picks], seed=seed)
    pred = edge.predict_classes(learner, data.x_test.astype(np.uint8), len(data.class_names))
    metrics = classification_metrics(data.y_test, pred, data.class_names)
    metrics["shots"] = int(len(picks))
    return metrics
