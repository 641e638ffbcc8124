"""Named Keras building blocks shared by the QANA variants (Ghost, attention, heads)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

L = keras.layers

#: Bound of the ReLU used everywhere except the spike generator (Akida 1.0 needs bounded ReLUs).
RELU_MAX = 6.0
#: Name of the 1-bit spike generator that feeds the learnable head on Akida 1.0.
SPIKE_LAYER = "head_spike"
#: Name of the classifier layer (popped and replaced for on-chip learning).
HEAD_DENSE = "head_dense"

_BN = {"momentum": 0.9, "epsilon": 1e-3}


@keras.saving.register_keras_serializable(package="qanafed")
class SpikeReLU(keras.layers.Layer):
    """1-bit spike generator for training: fires 1 where ``x >= 0.5``, else 0 (straight-through).

    Forward it computes exactly what the Akida 1.0 spike layer computes once quantized — a
    ``ReLU(max 1)`` whose 1-bit output quantizer rounds ``clip(x, 0, 1)`` to {0, 1}, i.e. the
    step at 0.5 — so the float head is trained on the binary features the chip will emit and
    on-chip learning sees class-dependent spikes. Backward it passes the gradient straight
    through on ``-0.5 <= x <= 1.5`` (one unit either side of the threshold, so a channel that
    is off or saturated for a whole batch still learns) and blocks it elsewhere.

    :func:`spike_as_relu` swaps it for the ``ReLU(1.0)`` quantizeml quantizes.

    ``margin`` (set by training, 0 = off) adds the training loss
    ``mean(relu(margin − |x − 0.5|)) / margin``: it pushes pre-spike values out of a band
    around the threshold, so that the rounding of the 4-bit layers before it cannot flip a
    spike (a float model whose values crowd the threshold loses most of its accuracy at
    quantization).
    """

    margin: float = 0.0

    def call(self, inputs, training=None):
        """Binarise ``inputs`` at 0.5 with a windowed straight-through gradient."""
        window = tf.clip_by_value(inputs, -0.5, 1.5)
        spikes = tf.cast(inputs >= 0.5, inputs.dtype)
        if training and self.margin > 0:
            band = tf.nn.relu(self.margin - tf.abs(inputs - 0.5))
            self.add_loss(tf.reduce_mean(band) / self.margin)
        return window + tf.stop_gradient(spikes - window)

    def compute_output_shape(self, input_shape):
        """Return the input shape (elementwise layer)."""
        return input_shape


def spike_as_relu(model: keras.Model) -> keras.Model:
    """Return ``model`` with every :class:`SpikeReLU` replaced by ``ReLU(1.0)`` of the same name.

    quantizeml quantizes a ``ReLU(1.0)`` with a 1-bit output quantizer into the same step at
    0.5; the weights are copied, so the clone computes what ``model`` computes after
    quantization. A model without a :class:`SpikeReLU` is returned unchanged (not cloned).
    """
    if not any(isinstance(layer, SpikeReLU) for layer in model.layers):
        return model

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, SpikeReLU):
            return L.ReLU(1.0, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=clone_function)
    clone.set_weights(model.get_weights())
    return clone


def scale_channels(channels: int, width: float, divisor: int = 4) -> int:
    """Scale a channel count by ``width`` and round it to a multiple of ``divisor`` (>= divisor)."""
    return max(divisor, int(round(channels * width / divisor)) * divisor)


def activation(x, kind: str | None, name: str):
    """Apply an activation by name.

    Parameters
    ----------
    x : tf.Tensor
        Input tensor.
    kind : str | None
        ``"relu6"`` (bounded ReLU), ``"spike"`` (:class:`SpikeReLU`, 1-bit step at 0.5),
        ``"hard_silu"`` / ``"swish"``
        (quantizeml self-gating activations, Akida 2.0 only), ``"relu"`` / ``"sigmoid"`` (float
        only) or None (identity, no layer added).
    name : str
        Layer name.
    """
    if kind is None:
        return x
    if kind == "relu6":
        return L.ReLU(RELU_MAX, name=name)(x)
    if kind == "spike":
        return SpikeReLU(name=name)(x)
    if kind in ("hard_silu", "swish"):
        from quantizeml.layers import Activation

        return Activation(kind, name=name)(x)
    if kind in ("relu", "sigmoid"):
        return L.Activation(kind, name=name)(x)
    raise ValueError(f"unknown activation {kind!r}")


def conv_bn_act(
    x,
    filters: int | None,
    kernel: int,
    prefix: str,
    *,
    stride: int = 1,
    act: str | None = "relu6",
    kind: str = "conv",
):
    """Convolution (``kind`` = conv | dw | sep), BatchNormalization and activation.

    Layers are named ``{prefix}`` (the convolution), ``{prefix}_bn`` and ``{prefix}_relu``
    (or ``{prefix}_act`` for non-ReLU activations).
    """
    common = {"strides": stride, "padding": "same", "use_bias": False, "name": prefix}
    if kind == "conv":
        layer = L.Conv2D(filters, kernel, **common)
    elif kind == "dw":
        layer = L.DepthwiseConv2D(kernel, **common)
    elif kind == "sep":
        layer = L.SeparableConv2D(filters, kernel, **common)
    else:
        raise ValueError(f"unknown convolution kind {kind!r}")
    x = layer(x)
    x = L.BatchNormalization(name=f"{prefix}_bn", **_BN)(x)
    suffix = "relu" if act in ("relu6", "spike", "relu") else "act"
    return activation(x, act, f"{prefix}_{suffix}")


# ---------------------------------------------------------------------------------------------
# Ghost modules
# ---------------------------------------------------------------------------------------------


def fold_ghost(
    depthwise_kernel: np.ndarray, depthwise_bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a Ghost module's cheap depthwise op and its concat into one dense convolution.

    A Ghost module outputs ``concat([p, dw(p)])`` where ``p`` is the primary 1×1 convolution.
    That equals one k×k convolution of ``p`` whose kernel is ``[centre identity | depthwise]``:
    output channel ``i < μC`` copies input ``i``; output ``μC + i`` is the depthwise filter ``i``.

    Parameters
    ----------
    depthwise_kernel : np.ndarray
        Depthwise kernel of shape ``(k, k, μC, 1)`` (Keras ``DepthwiseConv2D`` layout).
    depthwise_bias : np.ndarray | None (default: None)
        Depthwise bias of shape ``(μC,)``; zeros when None.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Kernel of shape ``(k, k, μC, 2μC)`` and bias of shape ``(2μC,)``.
    """
    dw = np.asarray(depthwise_kernel, dtype=np.float32)
    if dw.ndim != 4 or dw.shape[0] != dw.shape[1] or dw.shape[0] % 2 == 0 or dw.shape[3] != 1:
        raise ValueError(f"expected a (k, k, C, 1) depthwise kernel with odd k, got {dw.shape}")
    k, _, mc, _ = dw.shape
    kernel = np.zeros((k, k, mc, 2 * mc), dtype=np.float32)
    idx = np.arange(mc)
    kernel[k // 2, k // 2, idx, idx] = 1.0
    kernel[:, :, idx, mc + idx] = dw[:, :, idx, 0]
    bias = np.zeros(2 * mc, dtype=np.float32)
    if depthwise_bias is not None:
        bias[mc:] = np.asarray(depthwise_bias, dtype=np.float32)
    return kernel, bias


def ghost_mask(kernel_shape: tuple[int, ...]) -> np.ndarray:
    """0/1 mask of the entries a folded Ghost kernel may use (centre diagonal | depthwise)."""
    k, _, mc, out = kernel_shape
    if out != 2 * mc:
        raise ValueError(f"a folded Ghost kernel has 2×μC outputs, got shape {kernel_shape}")
    mask = np.zeros(kernel_shape, dtype=np.float32)
    idx = np.arange(mc)
    mask[k // 2, k // 2, idx, idx] = 1.0
    mask[:, :, idx, mc + idx] = 1.0
    return mask


@keras.saving.register_keras_serializable(package="qanafed")
class GhostFold(keras.constraints.Constraint):
    """Keep a folded Ghost kernel in Ghost form during training (zero every other entry).

    The mask only zeroes entries, so it stays valid after quantizeml folds BatchNormalization
    scales into the kernel (a per-output-channel scaling keeps the zero pattern).
    """

    def __call__(self, w):
        """Project ``w`` onto the Ghost structure."""
        return w * ghost_mask(tuple(int(d) for d in w.shape))

    def get_config(self) -> dict:
        """Return an empty config (the mask follows from the kernel shape)."""
        return {}


def ghost_folded(x, out_channels: int, prefix: str, act: str | None = "relu6"):
    """Sequential (Akida 1.0) Ghost module: 1×1 primary conv to μC, folded 3×3 cheap conv.

    Layers: ``{prefix}_ghost_primary`` (+ ``_bn``, ``_relu``) and ``{prefix}_ghost_cheap``
    (+ ``_bn``, ``_relu``). The cheap kernel is initialised with :func:`fold_ghost` by
    :func:`init_ghost_folds` and held in Ghost form by :class:`GhostFold`.
    """
    if out_channels % 2:
        raise ValueError(f"a Ghost module needs an even channel count, got {out_channels}")
    mc = out_channels // 2
    x = conv_bn_act(x, mc, 1, f"{prefix}_ghost_primary", act=act)
    x = L.Conv2D(
        out_channels,
        3,
        padding="same",
        use_bias=False,
        kernel_constraint=GhostFold(),
        name=f"{prefix}_ghost_cheap",
    )(x)
    x = L.BatchNormalization(name=f"{prefix}_ghost_cheap_bn", **_BN)(x)
    return activation(x, act, f"{prefix}_ghost_cheap_relu")


def init_ghost_folds(model: keras.Model, seed: int = 0) -> None:
    """Initialise every folded Ghost kernel of ``model`` as an exact Ghost module."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(getattr(layer, "kernel_constraint", None), GhostFold):
            k, _, mc, _ = layer.kernel.shape
            limit = np.sqrt(6.0 / (k * k * 2))  # Glorot-uniform of a depthwise filter
            dw = rng.uniform(-limit, limit, size=(k, k, mc, 1)).astype(np.float32)
            layer.kernel.assign(fold_ghost(dw)[0])


def ghost_concat(x, out_channels: int, prefix: str, act: str | None = "relu6"):
    """Ghost module as published: 1×1 primary conv, 3×3 depthwise cheap op, concatenation.

    Layers: ``{prefix}_ghost_primary``, ``{prefix}_ghost_cheap`` (each + ``_bn`` and activation)
    and ``{prefix}_ghost_concat``.
    """
    if out_channels % 2:
        raise ValueError(f"a Ghost module needs an even channel count, got {out_channels}")
    p = conv_bn_act(x, out_channels // 2, 1, f"{prefix}_ghost_primary", act=act)
    c = conv_bn_act(p, None, 3, f"{prefix}_ghost_cheap", act=act, kind="dw")
    return L.Concatenate(name=f"{prefix}_ghost_concat")([p, c])


# ---------------------------------------------------------------------------------------------
# Attention: additive (Akida 2.0) and multiplicative (float reference)
# ---------------------------------------------------------------------------------------------


def sa_eca_additive(x, prefix: str):
    """Spatially-aware ECA rebuilt for Akida 2.0: ``x + pw(hard_silu(dw3x3(x)))``.

    The spatial context (depthwise 3×3) is self-gated with quantizeml's ``hard_silu`` and mixed
    across channels by a 1×1 convolution, then *added* to the input: no tensor×tensor multiply.
    """
    channels = int(x.shape[-1])
    c = conv_bn_act(x, None, 3, f"{prefix}_eca_dw", act="hard_silu", kind="dw")
    c = conv_bn_act(c, channels, 1, f"{prefix}_eca_pw", act=None)
    return L.Add(name=f"{prefix}_eca_add")([x, c])


def se_additive(x, prefix: str, reduction: int = 4):
    """Squeeze-excitation rebuilt for Akida 2.0: the global context is added, not multiplied.

    Squeeze: 1×1 conv → ReLU → GlobalAveragePooling (keepdims); excite: 1×1 conv → ReLU;
    broadcast back to H×W with stride-2 ``DepthwiseConv2DTranspose`` layers (kernel 4,
    initialised to nearest-neighbour upsampling by :func:`init_upsamplers`); then Add.
    The spatial size must be a power of two.
    """
    from quantizeml.layers import DepthwiseConv2DTranspose

    height, channels = int(x.shape[1]), int(x.shape[-1])
    if height & (height - 1):
        raise ValueError(f"additive SE needs a power-of-two spatial size, got {height}")
    s = conv_bn_act(x, max(4, channels // reduction), 1, f"{prefix}_se_reduce")
    s = L.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}_se_pool")(s)
    s = conv_bn_act(s, channels, 1, f"{prefix}_se_expand")
    size, i = 1, 0
    while size < height:
        s = DepthwiseConv2DTranspose(4, 2, padding="same", name=f"{prefix}_se_up{i}")(s)
        size, i = size * 2, i + 1
    return L.Add(name=f"{prefix}_se_add")([x, s])


def init_upsamplers(model: keras.Model) -> None:
    """Set every SE broadcast ``DepthwiseConv2DTranspose`` to exact nearest-neighbour upsampling."""
    taps = np.array([0.0, 1.0, 1.0, 0.0], dtype=np.float32)
    for layer in model.layers:
        if "_se_up" in layer.name:
            kernel = layer.depthwise_kernel
            channels = int(kernel.shape[2])
            k2d = np.outer(taps, taps)[:, :, None, None]
            kernel.assign(np.repeat(k2d, channels, axis=2))
            if layer.use_bias:
                layer.bias.assign(np.zeros_like(layer.bias.numpy()))


def sa_eca_multiplicative(x, prefix: str, k_size: int = 3):
    """Spatially-aware ECA as published (float only): ECA channel gate then a spatial gate.

    Channel gate: GAP → Conv1D(k) over channels → sigmoid → multiply. Spatial gate: 7×7 conv to
    one map → sigmoid → multiply.
    """
    channels = int(x.shape[-1])
    g = L.GlobalAveragePooling2D(name=f"{prefix}_eca_pool")(x)
    g = L.Reshape((channels, 1), name=f"{prefix}_eca_seq")(g)
    g = L.Conv1D(1, k_size, padding="same", use_bias=False, name=f"{prefix}_eca_conv1d")(g)
    g = L.Activation("sigmoid", name=f"{prefix}_eca_sigmoid")(g)
    g = L.Reshape((1, 1, channels), name=f"{prefix}_eca_gate")(g)
    x = L.Multiply(name=f"{prefix}_eca_mul")([x, g])
    s = L.Conv2D(1, 7, padding="same", name=f"{prefix}_sa_conv")(x)
    s = L.Activation("sigmoid", name=f"{prefix}_sa_sigmoid")(s)
    return L.Multiply(name=f"{prefix}_sa_mul")([x, s])


def se_multiplicative(x, prefix: str, reduction: int = 4):
    """Squeeze-excitation as published (float only): GAP → FC → ReLU → FC → sigmoid → multiply."""
    channels = int(x.shape[-1])
    s = L.GlobalAveragePooling2D(name=f"{prefix}_se_pool")(x)
    s = L.Dense(max(4, channels // reduction), name=f"{prefix}_se_reduce")(s)
    s = L.Activation("relu", name=f"{prefix}_se_relu")(s)
    s = L.Dense(channels, name=f"{prefix}_se_expand")(s)
    s = L.Activation("sigmoid", name=f"{prefix}_se_sigmoid")(s)
    s = L.Reshape((1, 1, channels), name=f"{prefix}_se_gate")(s)
    return L.Multiply(name=f"{prefix}_se_mul")([x, s])


def stem(inputs, channels: int):
    """Rescaling(1/255) absorbed by Akida's input quantizer, then a 3×3 stride-2 conv block."""
    x = L.Rescaling(1.0 / 255.0, name="stem_rescale")(inputs)
    return conv_bn_act(x, channels, 3, "stem_conv", stride=2)


def spike_head(x, channels: int, num_classes: int):
    """Akida 1.0 head with a learnable-layer-ready spike generator.

    SeparableConv2D ``head_conv`` → BN ``head_bn`` → GAP ``head_pool`` → :class:`SpikeReLU`
    ``head_spike`` (:data:`SPIKE_LAYER`) → Dense ``head_dense`` (:data:`HEAD_DENSE`): the
    pattern Akida 1.0 converts (SepConv → BN → GAP → ReLU → Dense). The spike generator is
    trained as the 1-bit step it becomes on the chip (swapped for a 1-bit-quantized
    ``ReLU(max 1)`` at quantization), so on-chip learning can replace the Dense head.
    """
    x = L.SeparableConv2D(channels, 3, padding="same", use_bias=False, name="head_conv")(x)
    # beta starts at the 0.5 spike threshold, so about half the channels fire from the start.
    x = L.BatchNormalization(
        momentum=0.9, epsilon=1e-3, beta_initializer=keras.initializers.Constant(0.5),
        name="head_bn",
    )(x)
    x = L.GlobalAveragePooling2D(name="head_pool")(x)
    x = SpikeReLU(name=SPIKE_LAYER)(x)
    return L.Dense(num_classes, name=HEAD_DENSE)(x)
