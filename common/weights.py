"""Named model variables: which ones a site exchanges, read and written by variable name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .errors import ModelError

#: Variable groups, by what they are. Every model variable falls in exactly one.
TRAINABLE = "trainable"
BN_STATS = "bn-stats"
QUANTIZER = "quantizer"
OTHER = "other"

_BN_SUFFIXES = ("moving_mean", "moving_variance")
_QUANTIZER_SUFFIXES = ("range_max", "range_min", "rescaling_rate")


def variable_key(variable) -> str:
    """Return the exchange key of a variable: its name without the ``:0`` suffix."""
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def _canonical_layer_name(layer) -> str:
    """Stable layer name: quantizeml's auto-named InputQuantizer gets one fixed name."""
    return "input_quantizer" if layer.__class__.__name__ == "InputQuantizer" else layer.name


def canonical_layers(model) -> dict[str, object]:
    """Map stable layer names to the model's layers (see :func:`named_variables`)."""
    return {_canonical_layer_name(layer): layer for layer in model.layers}


def named_variables(model) -> list[tuple[str, object]]:
    """Return ``(key, variable)`` pairs with keys stable across processes and sessions.

    Keys are variable names without ``:0``; the prefix of quantizeml's auto-named
    ``input_quantizer_<n>`` layer becomes ``input_quantizer``. Our own layers have stable names.
    """
    out = []
    seen = set()
    for layer in model.layers:
        canonical = _canonical_layer_name(layer)
        for var in layer.weights:
            if id(var) in seen:
                continue
            seen.add(id(var))
            key = variable_key(var)
            if canonical != layer.name and key.startswith(layer.name + "/"):
                key = canonical + key[len(layer.name):]
            out.append((key, var))
    return out


def variable_group(key: str, trainable: bool) -> str:
    """Classify one variable.

    Parameters
    ----------
    key : str
        Variable key (``layer/.../leaf``).
    trainable : bool
        Whether the variable is trained by gradient descent.

    Returns
    -------
    str
        ``trainable``, ``bn-stats`` (BatchNormalization moving statistics), ``quantizer``
        (calibrated ranges and cross-layer rescaling rates of quantizeml) or ``other``.
    """
    leaf = key.rsplit("/", 1)[-1]
    if trainable:
        return TRAINABLE
    if leaf in _BN_SUFFIXES:
        return BN_STATS
    if leaf in _QUANTIZER_SUFFIXES:
        return QUANTIZER
    return OTHER


def is_statistic(key: str) -> bool:
    """Tell, from its key alone, whether an exchanged array holds statistics, not trained weights.

    BatchNormalization moving statistics and quantizer state (the ``bn-stats`` and
    ``quantizer`` groups of :func:`variable_group`) are recognised by their leaf name. A server
    optimizer must combine them by their averaging rule and never step them like weights.
    """
    return key.rsplit("/", 1)[-1] in _BN_SUFFIXES + _QUANTIZER_SUFFIXES


def is_quantizer_state(key: str) -> bool:
    """Tell, from its key alone, whether an array is quantizer state (the ``quantizer`` group).

    Only the calibration round exchanges it; a training round's reply carrying it is refused.
    """
    return key.rsplit("/", 1)[-1] in _QUANTIZER_SUFFIXES


def get_arrays(model, groups: Iterable[str]) -> dict[str, np.ndarray]:
    """Read the model's variables of the given groups as ``{key: array}``.

    Parameters
    ----------
    model : tf_keras.Model
        Any built model (float or quantized).
    groups : Iterable[str]
        Groups to include (see :func:`variable_group`).

    Raises
    ------
    ModelError
        If two variables share a key (layers must have unique, stable names).
    """
    wanted = set(groups)
    out: dict[str, np.ndarray] = {}
    for key, var in named_variables(model):
        if variable_group(key, var.trainable) not in wanted:
            continue
        if key in out:
            raise ModelError(
                f"two variables of model {model.name!r} are both named {key!r}",
                "give every layer a unique, stable name (prefixes per block)",
            )
        out[key] = np.array(var.numpy(), copy=True)
    return out


def set_arrays(model, arrays: Mapping[str, np.ndarray], *, strict: bool = True) -> int:
    """Assign arrays to the model's variables by key.

    Parameters
    ----------
    model : tf_keras.Model
        The model to update in place.
    arrays : Mapping[str, np.ndarray]
        ``{key: array}`` as given by :func:`get_arrays`.
    strict : bool (default: True)
        Raise if a key has no variable in the model.

    Returns
    -------
    int
        Number of variables assigned.

    Raises
    ------
    ModelError
        On an unknown key (``strict``) or a shape mismatch, naming the key and both shapes.
    """
    by_key = dict(named_variables(model))
    missing = [k for k in arrays if k not in by_key]
    if strict and missing:
        raise ModelError(
            f"model {model.name!r} has no variables {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}",
            "sites and server must build the same variant, size and width",
        )
    n = 0
    for key, value in arrays.items():
        var = by_key.get(key)
        if var is None:
            continue
        value = np.asarray(value)
        if tuple(var.shape) != value.shape:
            raise ModelError(
                f"variable {key!r} has shape {tuple(var.shape)} but received {value.shape}",
                "sites and server must build the same variant, size and width",
            )
        var.assign(value.astype(var.dtype.as_numpy_dtype))
        n += 1
    return n


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Total payload size of named arrays, in bytes."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
