"""The coordinator's side of the model: initial weights, the one quantized model, its Akida hash."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from common.fedconfig import FedConfig


class GlobalModel(Protocol):
    """What the driver needs from the model code; plain numpy in and out, no Flower."""

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """Float model arrays every site starts from (seeded by the run seed)."""
        ...

    def quantize(
        self, float_arrays: dict[str, np.ndarray], ranges: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Build the ONE global quantized model from float weights and combined ranges."""
        ...

    def finalize(self, arrays: dict[str, np.ndarray], out_dir: Path) -> str | None:
        """Convert the global model to Akida, save it in ``out_dir``; return its hash."""
        ...


class QanaGlobalModel:
    """:class:`GlobalModel` for the QANA variants, on the shared model/quantize/convert code.

    Parameters
    ----------
    cfg : FedConfig
        The scenario (variant, size, width, seed).
    num_classes : int
        Output classes of the data set.
    class_names : list[str] | None (default: None)
        Their names, recorded beside the saved global model.
    """

    def __init__(
        self, cfg: FedConfig, num_classes: int, class_names: list[str] | None = None
    ) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.class_names = class_names
        self._qmodel = None  # the quantized model built at calibration, reused to convert

    def _float_model(self):
        from common.site import build_float_model

        return build_float_model(self.cfg, self.num_classes)

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """Float arrays of a freshly built, seeded model."""
        import tf_keras as keras

        from common.aggregate import EXCHANGED
        from common.weights import get_arrays

        keras.backend.clear_session()
        keras.utils.set_random_seed(self.cfg.seed)
        return get_arrays(self._float_model(), EXCHANGED["warmup"])

    def quantize(
        self, float_arrays: dict[str, np.ndarray], ranges: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Quantize the global float model, then apply the sites' combined ranges."""
        from common.site import quantized_from_ranges
        from common.weights import BN_STATS, QUANTIZER, TRAINABLE, get_arrays

        qmodel = quantized_from_ranges(self.cfg, self.num_classes, float_arrays, ranges)
        self._qmodel = qmodel
        return get_arrays(qmodel, (TRAINABLE, BN_STATS, QUANTIZER))

    def finalize(self, arrays: dict[str, np.ndarray], out_dir: Path) -> str | None:
        """Convert to Akida, save ``global_model.fbz``, return the Akida model hash.

        The quantized model built at calibration is reused when this process built one
        (all its variables are overwritten with ``arrays``); after a resume it is rebuilt.
        """
        from common.site import akida_from_arrays, convert
        from common.weights import set_arrays

        if self.cfg.model.variant == "qana-float":
            return None
        if self._qmodel is not None:
            set_arrays(self._qmodel, arrays)
            akida_model, digest = convert(self.cfg, self._qmodel)
        else:
            akida_model, digest = akida_from_arrays(self.cfg, self.num_classes, arrays)
        from common.convert import save_akida
        from common.model_meta import model_meta

        meta = None
        if self.class_names is not None:
            meta = model_meta(
                variant=self.cfg.model.variant, size=self.cfg.model.size,
                class_names=self.class_names, colour=self.cfg.model.colour, akida_hash=digest,
                tta=self.cfg.tta,
            )
        save_akida(akida_model, Path(out_dir) / "global_model.fbz", meta=meta)
        return digest
