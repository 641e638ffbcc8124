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
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import EXCHANGED
from .errors import ConfigError, DataError
from .fedconfig import FedConfig
from .local_training import CACHE, FLOAT, QUANTIZED, LocalModel, from_logits, predict_logits, train
from .log import get_logger
from .weights import get_arrays, set_arrays

log = get_logger("site")


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


@lru_cache(maxsize=1)
def _dataset(data: str):
    """Load (or generate) a data set once per process: simulated sites share one."""
    from .loaders import load_dataset

    return load_dataset(data)


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
    colour: str = "none",
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
    colour : str (default: "none")
        Colour constancy applied to every image (the scenario's ``model.colour``).

    Raises
    ------
    DataError
        If the partition is empty or too small to split.
    """
    from .preprocess import load_arrays

    ds = _dataset(data)
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
    x = load_arrays(ds, size, colour=colour)
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
                          p.seed, cfg.test_fraction, site_id, cfg.model.colour)


def new_class_index(cfg: FedConfig, class_names: tuple[str, ...]) -> int | None:
    """Index of the class held out of federated training (``edge.new-class``), or None.

    Raises
    ------
    ConfigError
        If the scenario names a class the data does not have.
    """
    name = cfg.edge.new_class
    if name is None:
        return None
    if name not in class_names:
        raise ConfigError(
            f"edge.new-class {name!r} is not a class of the data ({', '.join(class_names)})",
            "name one of the data's classes, or remove edge.new-class",
        )
    return class_names.index(name)


def federated_part(
    cfg: FedConfig, data: SiteData, part: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return the site's ``train`` or ``test`` images of the federated classes (new class out)."""
    x, y = (data.x_train, data.y_train) if part == "train" else (data.x_test, data.y_test)
    held_out = new_class_index(cfg, data.class_names)
    if held_out is None:
        return x, y
    keep = y != held_out
    return x[keep], y[keep]


# -- models ---------------------------------------------------------------------------------------
#: Suffix of a PACT clip's array key (``<layer>/alpha``, a trainable weight of the float model).
PACT_KEY = "/alpha"


def split_pact(arrays: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Split global arrays into the PACT clips ``{layer: α}`` and the other arrays.

    After calibration the global arrays keep the baked α next to the quantized model's
    variables: the quantized model's ReLU bounds are part of its structure, not variables, so
    whoever rebuilds it (a fresh site process, the server after a resume) needs them.
    """
    alphas = {k[: -len(PACT_KEY)]: float(np.asarray(v)) for k, v in arrays.items()
              if k.endswith(PACT_KEY)}
    rest = {k: v for k, v in arrays.items() if not k.endswith(PACT_KEY)}
    return alphas, rest


def pact_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return only the PACT clips of ``arrays`` (``<layer>/alpha`` keys), as arrays."""
    return {k: v for k, v in arrays.items() if k.endswith(PACT_KEY)}


def build_float_model(cfg: FedConfig, num_classes: int):
    """Build the scenario's float model (fresh weights; PACT clips when ``pact.enabled``).

    Raises
    ------
    ConfigError
        If ``pact.enabled`` but the variant has no bounded ReLU to make learnable.
    """
    from .models import create_model

    model = create_model(cfg.model.variant, input_size=cfg.model.size, num_classes=num_classes,
                         width=cfg.model.width, depth=cfg.model.depth, seed=cfg.seed)
    if not cfg.pact.enabled:
        return model
    from .pact import apply_pact, pact_alphas

    model = apply_pact(model, cfg.pact.alpha_init, cfg.pact.l2)
    if not pact_alphas(model):
        raise ConfigError(
            f"pact.enabled is true but variant {cfg.model.variant!r} has no bounded ReLU to "
            "give a learnable clip",
            "set pact.enabled: false for this variant (PACT applies to qana-akd1000's ReLUs)",
        )
    return model


def _baked(cfg: FedConfig, model, alphas: dict[str, float] | None = None):
    """Return the float model quantizeml takes: PACT clips baked into ``ReLU(max_value=α)``.

    ``alphas`` (``{layer: α}``) are set first when given; without PACT ``model`` is returned.
    """
    if not cfg.pact.enabled:
        return model
    from .pact import bake_pact

    if alphas:
        set_arrays(model, {f"{k}{PACT_KEY}": np.float32(v) for k, v in alphas.items()})
    return bake_pact(model)


def _quantize(cfg: FedConfig, model, samples: np.ndarray):
    from .quantize import quantize_model

    return quantize_model(model, cfg.model.variant, samples.astype(np.float32))


def _structure_samples(cfg: FedConfig) -> np.ndarray:
    """Return a few fixed images to build a quantized model's structure (ranges are overwritten)."""
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (4, cfg.model.size, cfg.model.size, 3)).astype(np.float32)


def build_quantized_model(
    cfg: FedConfig, num_classes: int, alphas: dict[str, float] | None = None
):
    """Build the scenario's quantized model structure (every variable is set from arrays later).

    With PACT the ReLU bounds are the baked ``alphas`` (``{layer: α}``, see :func:`split_pact`).
    """
    return _quantize(cfg, _baked(cfg, build_float_model(cfg, num_classes), alphas),
                     _structure_samples(cfg))


def float_model_from(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Build the float model with the given (global) arrays."""
    model = build_float_model(cfg, num_classes)
    set_arrays(model, arrays)
    return model


def quantized_model_from(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Rebuild the global quantized model exactly from its arrays (weights and quantizer state)."""
    alphas, rest = split_pact(arrays)
    qmodel = build_quantized_model(cfg, num_classes, alphas)
    set_arrays(qmodel, rest)
    return qmodel


def quantized_from_ranges(
    cfg: FedConfig, num_classes: int, float_arrays: dict[str, np.ndarray], ranges: dict
):
    """Server side of calibration: quantize the global float model and set the combined ranges.

    With PACT the global α (part of ``float_arrays``) is baked into the ReLU bounds first, as
    every site does before calibrating.
    """
    from .aggregate import apply_ranges
    from .models import get_variant

    qmodel = _quantize(cfg, _baked(cfg, float_model_from(cfg, num_classes, float_arrays)),
                       _structure_samples(cfg))
    apply_ranges(qmodel, ranges)
    if cfg.rounds.qat > 0 and get_variant(cfg.model.variant).akida_version == "v1":
        # As in centralized training: the QAT rounds learn on the power-of-two channel
        # scales of the exact Akida 1.0 conversion, instead of meeting them at finalize.
        from .akida_exact import pow2_output_scales

        pow2_output_scales(qmodel)
    return qmodel


def convert(cfg: FedConfig, qmodel):
    """Convert a quantized model to Akida; return ``(akida_model, hash)``.

    quantizeml names its input layer ``input_quantizer_<n>`` after the number of models built
    in the process, and the name is part of the Akida model's bytes: it is renamed to the
    canonical ``input_quantizer`` first, so the hash depends on the weights only, whichever
    process (server, site, cached or fresh model) converts. Akida 1.0 models are converted
    bit-exactly (:func:`common.akida_exact.convert_exact`, which sets power-of-two output scales
    on ``qmodel`` in place), so the chip computes what the quantized model computed.
    """
    from .akida_exact import convert_exact
    from .convert import model_hash
    from .weights import canonical_layers

    for name, layer in canonical_layers(qmodel).items():
        if layer.name != name:
            layer._name = name  # Keras has no public rename
    akida_model = convert_exact(qmodel, cfg.model.variant)
    return akida_model, model_hash(akida_model)


def akida_from_arrays(cfg: FedConfig, num_classes: int, arrays: dict[str, np.ndarray]):
    """Convert the global quantized model to Akida; return ``(akida_model, hash)``.

    Returns ``(None, None)`` for the float reference variant, which does not convert.
    """
    if cfg.model.variant == "qana-float":
        return None, None
    return convert(cfg, quantized_model_from(cfg, num_classes, arrays))


def _model_key(cfg: FedConfig, num_classes: int) -> tuple:
    m = cfg.model
    p = cfg.pact
    return (m.variant, m.size, m.width, m.depth, cfg.seed, num_classes,
            p.enabled, p.alpha_init, p.l2)


def _sgt_options(cfg: FedConfig, kind: str):
    from .local_training import SgtOptions

    s = cfg.sgt
    if not s.enabled or (kind == QUANTIZED and not s.in_qat):
        return None
    return SgtOptions(s.mask_fraction, s.kl_weight)


def local_model(
    cfg: FedConfig, num_classes: int, kind: str, alphas: dict[str, float] | None = None
) -> LocalModel:
    """Return this process's cached float or quantized model (built, traced once per scenario).

    ``alphas`` (``{layer: α}``, quantized kind with PACT) are the baked ReLU bounds the
    quantized model is built with; a model cached with other bounds is rebuilt.
    """
    tag = tuple(sorted(alphas.items())) if (kind == QUANTIZED and alphas) else None
    if kind == FLOAT:
        def build():
            return build_float_model(cfg, num_classes)
    else:
        def build():
            return build_quantized_model(cfg, num_classes, alphas)
    return CACHE.get(_model_key(cfg, num_classes), kind, build, tag=tag,
                     sgt=_sgt_options(cfg, kind))


# -- training and evaluation ----------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import tf_keras as keras

    keras.utils.set_random_seed(seed)


def _train_arrays(data: SiteData, cfg: FedConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Federated training images (new class left out), balanced as the scenario says.

    ``sampler`` leaves the arrays as they are: it balances the batches (:func:`train_local`).
    """
    x, y = federated_part(cfg, data, "train")
    if cfg.balance in ("none", "sampler") or len(y) == 0:
        return x, y
    from .balance import balance_train

    return balance_train(x, y, cfg.balance, seed=seed)


def train_local(
    local: LocalModel,
    data: SiteData,
    cfg: FedConfig,
    lr: float,
    epochs: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train the already-loaded ``local`` model on the site's training split, deterministically.

    Batches: with ``balance: sampler`` drawn with :func:`common.balance.sampling_probs` of
    this site's own labels at ``sampling-power``. Loss: cross-entropy, or with ``loss:
    logit-adjusted`` cross-entropy on ``logits + la-tau · log(prior)`` where ``prior`` is
    this site's own effective training prior (:func:`site_prior`), plus ``proximal_mu / 2 *
    ||w - w_global||²`` over the trainable weights when ``proximal_mu > 0`` (FedProx;
    ``w_global`` = the weights at entry).

    Returns
    -------
    dict[str, float]
        ``train_loss`` (label loss, mean over the last epoch) and ``train_examples``
        (after balancing; the sampler draws as many per epoch).

    Raises
    ------
    DataError
        If the site has no training image of the federated classes.
    """
    x, y = _train_arrays(data, cfg, seed)
    if len(y) == 0:
        raise DataError(f"site {data.site_id!r} has no training images of the federated classes",
                        "give the site data, or leave it out of the federation")
    local.mu.assign(float(proximal_mu))
    local.optimizer.learning_rate = float(lr)
    num_classes = len(data.class_names)
    if cfg.loss == "logit-adjusted":
        local.set_prior(site_prior(cfg, y, num_classes), cfg.la_tau)
    else:
        local.set_prior(None, 0.0)
    probs = None
    if cfg.balance == "sampler":
        from .balance import sampling_probs

        probs = sampling_probs(y, cfg.sampling_power)
    loss = train(local, x, y, epochs=epochs, batch_size=cfg.batch_size, augment=cfg.augment,
                 seed=seed, sample_probs=probs)
    return {"train_loss": loss, "train_examples": int(len(y))}


def site_prior(cfg: FedConfig, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the class prior of this site's training batches, for its logit-adjusted loss.

    Logit adjustment (Menon et al., arXiv 2007.07314) adds ``tau · log(prior)`` of the
    *training* distribution to the logits in the loss; the loss is then minimised by logits
    ``log p(x | y) + const``, i.e. the plain logits estimate a class-balanced posterior. In a
    federation each site trains on its own class mix, and the per-site prior is the federated
    form: with each site's own ``π_k`` every site's optimum is the same balanced posterior
    (under label shift: sites differ in their class mix, not in how a class looks), so the
    local updates agree and the aggregated model estimates it too, whereas one global prior
    would tilt each site's optimum by ``log π_k - log π_global`` towards its own mix. A class
    the site lacks counts as one image: its adjusted logit is then very low, so the site
    barely pushes that class's plain logit down. The prior is of the batches as drawn: ``y``
    (after any array balancing) at ``sampling-power`` with ``balance: sampler``, else as is.
    """
    from .balance import effective_prior

    power = cfg.sampling_power if cfg.balance == "sampler" else 0.0
    return effective_prior(y, num_classes, power, warn=False)


def _scores(
    logits: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], from_logits_: bool
) -> dict[str, Any]:
    import tensorflow as tf

    from .metrics import classification_metrics

    metrics = classification_metrics(y, np.argmax(logits, axis=-1), class_names)
    loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=from_logits_)
    metrics["loss"] = float(np.mean(loss))
    return metrics


def tta_predict(model, x: np.ndarray, tta: int = 1) -> np.ndarray:
    """Logits of a Keras or Akida model on local images, averaged over ``tta`` views."""
    from .tta import is_akida, tta_logits

    logits, _ = tta_logits(model, x, tta, predict=None if is_akida(model) else predict_logits)
    return logits


def evaluate(
    model, x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], tta: int = 1
) -> dict[str, Any]:
    """Loss and classification metrics of a Keras model on local images (aggregates only).

    ``tta`` views (flips, 90° rotations, :mod:`common.tta`) are averaged per image.
    """
    return _scores(tta_predict(model, x, tta), y, class_names, from_logits(model))


# -- phases ---------------------------------------------------------------------------------------
def hello(data: SiteData, cfg: FedConfig | None = None) -> tuple[int, dict[str, Any]]:
    """Introduce the site: example weight and (sealed) data summary.

    Raises
    ------
    ConfigError
        If ``cfg`` names an ``edge.new-class`` the data does not have.
    """
    if cfg is not None:
        new_class_index(cfg, data.class_names)
    counts = np.bincount(data.y_train, minlength=len(data.class_names)).tolist()
    return len(data.y_train), {
        "class_names": list(data.class_names),
        "train_examples": int(len(data.y_train)),
        "test_examples": int(len(data.y_test)),
        "train_class_counts": counts,
        "test_class_counts": np.bincount(data.y_test, minlength=len(data.class_names)).tolist(),
    }


#: Metrics key of a round's scores of the site's own model after its local epochs.
LOCAL_AFTER_TRAINING = "local_after_training"


def _round(
    cfg: FedConfig, data: SiteData, kind: str, arrays: dict[str, np.ndarray], step: int,
    lr: float, epochs: int, mu: float,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """Score the received global model on the local test split, then train it locally.

    ``test`` holds the scores of the global model as received (federated evaluation: what
    the federation's model does at this site, before local training); ``local_after_training``
    those of the locally trained model the site sends back (locally tuned, not the
    federation's model).
    """
    seed = site_seed(cfg.seed, step, data.site_id)
    _seed_everything(seed)
    alphas = None
    if kind == QUANTIZED:  # the baked PACT bounds shape the quantized model; not exchanged
        alphas, arrays = split_pact(arrays)
    local = local_model(cfg, len(data.class_names), kind, alphas)
    local.start_round(arrays, lr, mu)
    x_test, y_test = federated_part(cfg, data, "test")
    received = (evaluate(local.model, x_test, y_test, data.class_names, cfg.tta) if len(y_test)
                else None)
    train = train_local(local, data, cfg, lr=lr, epochs=epochs, seed=seed, proximal_mu=mu)
    metrics: dict[str, Any] = {**train}
    if received is not None:
        metrics["test"] = received
        metrics[LOCAL_AFTER_TRAINING] = evaluate(local.model, x_test, y_test, data.class_names,
                                                 cfg.tta)
    groups = EXCHANGED["qat" if kind == QUANTIZED else "warmup"]
    return get_arrays(local.model, groups), train["train_examples"], metrics


def warmup(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int,
    lr: float, epochs: int, proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """One float warm-up round: score the global float arrays received, then train locally."""
    return _round(cfg, data, FLOAT, arrays, step, lr, epochs, proximal_mu)


def calibrate(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int,
    out_dir: Path | None = None,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """Calibrate the global float model's quantizers on local (federated-class) training images.

    With PACT the global α is baked into the ReLU bounds first (the server does the same), so
    every site calibrates the same model. With ``out_dir`` (the site's own output folder) and
    ``explain-images > 0`` the global float arrays are kept there for the final round's
    saliency overlays (:func:`explain_locally`); they never leave the site's disk.
    """
    seed = site_seed(cfg.seed, step, data.site_id)
    _seed_everything(seed)
    x, _ = federated_part(cfg, data, "train")
    rng = np.random.default_rng(seed)
    n = min(cfg.calibration_samples, len(x))
    if n == 0:
        raise DataError(f"site {data.site_id!r} has no training images to calibrate on",
                        "give the site data, or leave it out of the federation")
    idx = np.sort(rng.choice(len(x), size=n, replace=False))
    num_classes = len(data.class_names)
    local = local_model(cfg, num_classes, FLOAT)
    set_arrays(local.model, arrays)
    if out_dir is not None and cfg.explain_images > 0:
        _save_float_arrays(Path(out_dir), arrays)
    qmodel = _quantize(cfg, _baked(cfg, local.model), x[idx])
    state = get_arrays(qmodel, EXCHANGED["calibrate"])
    # Keep it as this process's quantized model: QAT rounds overwrite all its variables.
    alphas, _ = split_pact(arrays)
    CACHE.get(_model_key(cfg, num_classes), QUANTIZED, lambda: qmodel,
              tag=tuple(sorted(alphas.items())) or None, sgt=_sgt_options(cfg, QUANTIZED))
    return state, n, {"calibration_examples": int(n), "quantizers": len(state)}


def qat(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int,
    lr: float, epochs: int, proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """One QAT round on the global quantized model; quantizer state is received, never sent."""
    return _round(cfg, data, QUANTIZED, arrays, step, lr, epochs, proximal_mu)


def finalize(
    cfg: FedConfig, data: SiteData, arrays: dict[str, np.ndarray], step: int, server_hash: str,
    out_dir: Path | None = None, *, release: str | None = None,
    release_key: str | Path | None = None, run_id: str = "",
) -> tuple[int, dict[str, Any]]:
    """Convert the global model to Akida, check it, evaluate, learn on-chip, evaluate again.

    Every score here is on all the site's test images (the rounds score the federated
    classes only); with ``edge.new-class`` a ``new_class`` block splits them into old and
    new classes, before and after on-chip learning. With ``explain-images > 0`` a
    ``saliency`` block reports the overlays written to ``out_dir/saliency`` (see
    :func:`explain_locally`). The global model's quantized and Akida scores average the
    scenario's ``tta`` views; on-chip learning (one view) is compared with one view before.

    With a ``release_key`` (the site's trusted release public key) the signed ``release``
    sent with the arrays must verify for ``run_id`` and ``step`` and name these arrays
    before they are converted, and the conversion must give its signed Akida hash before
    anything is evaluated or learnt (:mod:`common.received_release`); otherwise
    :class:`~common.errors.SecurityError`.
    """
    from .metrics import classification_metrics
    from .received_release import check_akida_hash, verify_received

    manifest = None
    if cfg.model.variant != "qana-float":  # the float reference is never converted
        manifest = verify_received(release, release_key, arrays, site_id=data.site_id,
                                   run_id=run_id, step=step)

    seed = site_seed(cfg.seed, step, data.site_id)
    _seed_everything(seed)
    names = data.class_names
    if cfg.model.variant == "qana-float":
        local = local_model(cfg, len(names), FLOAT)
        set_arrays(local.model, arrays)
        return len(data.y_train), {"test": evaluate(local.model, data.x_test, data.y_test,
                                                    names, cfg.tta)}
    alphas, arrays = split_pact(arrays)
    local = local_model(cfg, len(names), QUANTIZED, alphas)
    set_arrays(local.model, arrays)
    akida_model, digest = convert(cfg, local.model)
    check_akida_hash(manifest, digest, site_id=data.site_id, step=step)
    # after convert: it may rescale the quantized model in place
    logits = tta_predict(local.model, data.x_test, cfg.tta)
    pixels = data.x_test.astype(np.uint8)
    pred = tta_predict(akida_model, pixels, cfg.tta).argmax(axis=-1)
    report: dict[str, Any] = {
        "akida_hash": digest,
        "hash_matches_server": digest == server_hash,
        "tta": cfg.tta,
        "keras_quantized": _scores(logits, data.y_test, names, from_logits(local.model)),
        "akida": classification_metrics(data.y_test, pred, names),
        "akida_agreement": float(np.mean(pred == logits.argmax(axis=-1))),
        "akida_after_edge": None,
    }
    if cfg.explain_images > 0:
        report["saliency"] = explain_locally(cfg, data, local.model, out_dir, seed)
    from .models import get_variant

    if get_variant(cfg.model.variant).edge_learning:
        # On-chip learning predicts one view per image: compare it with one view before.
        single = pred if cfg.tta == 1 else tta_predict(akida_model, pixels).argmax(axis=-1)
        report.update(_edge_report(cfg, data, akida_model, single, seed))
    return len(data.y_train), report


# -- on-site saliency -----------------------------------------------------------------------------
#: File in the site's own output folder holding the global float model it calibrated.
FLOAT_ARRAYS_FILE = "global-float-arrays.npz"
#: Sub-folder of the site's output folder with the overlays.
SALIENCY_DIR = "saliency"


def _save_float_arrays(out_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Keep the global float arrays on the site's disk (atomically: temporary file, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FLOAT_ARRAYS_FILE
    tmp = out_dir / f".{FLOAT_ARRAYS_FILE}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def explain_locally(
    cfg: FedConfig, data: SiteData, qmodel, out_dir: Path | None, seed: int
) -> dict[str, Any]:
    """Write saliency overlays of a few of the site's own test images; return what is reported.

    Vanilla gradients and SmoothGrad (:func:`common.saliency.explain`) of the float global
    model calibrated in this federation (the float model the quantized one was made from,
    kept by :func:`calibrate`) and of the final quantized global model ``qmodel``, on the
    first ``explain-images`` test images of a seeded shuffle, named ``test-000`` ... (their
    index in the site's test split; no image id or label leaves the site). The PNGs and a
    ``summary.json`` with per-image predictions stay in ``out_dir/saliency``.

    Returns
    -------
    dict[str, Any]
        ``{"images", "files", "stability"}`` — file names relative to ``out_dir`` and the
        float→quantized stability per method (Spearman and top-10 % overlap, mean/median) —
        or ``{"error": reason}`` when the overlays could not be made (no output folder, no
        kept float model, float variant, no test image).
    """
    from .errors import QanafedError

    if cfg.model.variant == "qana-float":
        return {"error": "the float reference variant has no quantized model to compare"}
    if out_dir is None:
        log.warning("site %s: no output folder (node config out-dir): saliency skipped",
                    data.site_id)
        return {"error": "the site has no output folder (node config out-dir)"}
    out_dir = Path(out_dir)
    kept = out_dir / FLOAT_ARRAYS_FILE
    if not kept.is_file() or len(data.y_test) == 0:
        why = f"no {FLOAT_ARRAYS_FILE} kept at calibration" if not kept.is_file() else \
            "the site has no test image"
        log.warning("site %s: saliency skipped: %s", data.site_id, why)
        return {"error": why}
    try:
        from .saliency import explain

        with np.load(kept) as npz:
            float_model = float_model_from(cfg, len(data.class_names),
                                           {k: npz[k] for k in npz.files})
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(data.y_test))[: cfg.explain_images])
        summary = explain(float_model, qmodel, data.x_test[idx],
                          [f"test-{i:03d}" for i in idx], out_dir / SALIENCY_DIR,
                          class_names=data.class_names, labels=data.y_test[idx], seed=seed)
    except QanafedError as err:
        log.warning("site %s: saliency skipped: %s", data.site_id, err.problem)
        return {"error": err.problem}
    files = sorted(str(p.relative_to(out_dir)) for p in (out_dir / SALIENCY_DIR).rglob("*.png"))
    return {"images": int(summary["n_images"]), "files": files,
            "stability": summary["stability"]}


def _edge_report(
    cfg: FedConfig, data: SiteData, akida_model, pred_before: np.ndarray, seed: int
) -> dict[str, Any]:
    """On-chip learning and its scores, or the reason it was skipped."""
    from .edge import edge_learning_eval
    from .errors import QanafedError

    try:
        after, pred, new_info = _edge_learning(cfg, data, akida_model, seed)
    except QanafedError as err:  # e.g. an undertrained backbone emits no spikes
        log.warning("site %s: on-chip learning skipped: %s", data.site_id, err.problem)
        return {"akida_after_edge": {"error": err.problem}}
    out: dict[str, Any] = {"akida_after_edge": after}
    if new_info is not None:
        held_out = new_class_index(cfg, data.class_names)
        split = edge_learning_eval(data.y_test, pred, data.class_names, [held_out], pred_before)
        out["new_class"] = {**new_info,
                            "before": {k: split["before"][k] for k in ("old", "new")},
                            "after": {k: split["after"][k] for k in ("old", "new")}}
    return out


def _pick_shots(y: np.ndarray, classes: list[int], shots: int, rng) -> np.ndarray:
    picks: list[int] = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if len(idx):
            picks.extend(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist())
    return np.sort(np.asarray(picks, dtype=np.int64))


def _edge_learning(
    cfg: FedConfig, data: SiteData, akida_model, seed: int
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any] | None]:
    """Learn on-chip from ``edge.shots`` local training images per class; score on local test.

    The head starts with the federated classes (learned from their shots); with
    ``edge.new-class`` it then grows by one class (``add_classes``) learned from that class's
    shots alone — the few-shot new class the federation never saw.

    Returns
    -------
    tuple[dict[str, Any], np.ndarray, dict[str, Any] | None]
        Metrics after learning, the predictions (class indices of ``data``) and, with a new
        class, ``{"name", "shots", "learned"}``.
    """
    from . import edge
    from .metrics import classification_metrics

    rng = np.random.default_rng(seed)
    names = data.class_names
    held_out = new_class_index(cfg, names)
    old = [c for c in range(len(names)) if c != held_out]
    picks = _pick_shots(data.y_train, old, cfg.edge.shots, rng)
    head = {c: i for i, c in enumerate(old)}  # head neuron groups are numbered 0..k-1
    shots = data.x_train[picks].astype(np.uint8)
    learner = edge.prepare_edge_learning(akida_model, len(old), shots,
                                         neurons_per_class=cfg.edge.neurons_per_class)
    edge.learn(learner, shots, np.array([head[c] for c in data.y_train[picks]]), seed=seed)
    classes = list(old)
    new_info = None
    if held_out is not None:
        new_picks = _pick_shots(data.y_train, [held_out], cfg.edge.shots, rng)
        new_info = {"name": names[held_out], "shots": int(len(new_picks)),
                    "learned": bool(len(new_picks))}
        if len(new_picks):
            edge.add_classes(learner, 1)
            edge.learn(learner, data.x_train[new_picks].astype(np.uint8),
                       np.full(len(new_picks), len(old)), seed=seed + 1)
            classes.append(held_out)
        else:
            log.warning("site %s has no training image of the new class %r: not learned",
                        data.site_id, names[held_out])
    head_pred = edge.predict_classes(learner, data.x_test.astype(np.uint8), len(classes))
    pred = np.asarray(classes)[np.asarray(head_pred)]
    metrics = classification_metrics(data.y_test, pred, names)
    metrics["shots"] = int(len(picks)) + (new_info["shots"] if new_info else 0)
    return metrics, pred, new_info
