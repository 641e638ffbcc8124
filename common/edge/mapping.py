"""Map an Akida model onto a (virtual or real) Akida device and report what it uses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import akida
import numpy as np

from common.errors import ConfigError, ModelError
from common.log import get_logger

__all__ = ["DEVICE_NAMES", "ENERGY_NOTE", "MappingReport", "make_device", "map_model"]

log = get_logger("edge.mapping")

#: Virtual Akida 2.0 IPs that akida 2.19.3 ships, by node count.
_AKIDA2_NODES: dict[int, Callable[[], akida.Device]] = {
    2: akida.TwoNodesIPv2,
    4: akida.FourNodesIPv2,
    6: akida.SixNodesIPv2,
    12: akida.TwelveNodesIPv2,
}

#: Device names ``map_model`` accepts.
DEVICE_NAMES: tuple[str, ...] = ("akd1000", "akd1500", *(f"akida2-{n}n" for n in _AKIDA2_NODES))

#: What a report says when no chip is attached.
ENERGY_NOTE = "energy needs an Akida hardware device (akida.devices() is empty)"

_AKIDA_VERSION_NAME = {"v1": "Akida 1.0", "v2": "Akida 2.0"}


def make_device(name: str) -> akida.Device:
    """Return the virtual Akida device called ``name``.

    Parameters
    ----------
    name : str
        ``"akd1000"`` (Akida 1.0 NSoC, 78 NPs), ``"akd1500"`` (Akida 1.0, 32 NPs) or
        ``"akida2-<N>n"`` for a virtual Akida 2.0 IP with N ∈ {2, 4, 6, 12} nodes.

    Raises
    ------
    ConfigError
        If the name is not one of :data:`DEVICE_NAMES`.
    """
    key = name.strip().lower()
    if key == "akd1000":
        return akida.AKD1000()
    if key == "akd1500":
        return akida.AKD1500()
    match = re.fullmatch(r"akida2-(\d+)n", key)
    if match and int(match.group(1)) in _AKIDA2_NODES:
        return _AKIDA2_NODES[int(match.group(1))]()
    raise ConfigError(
        f"unknown Akida device {name!r}",
        f"use one of {', '.join(DEVICE_NAMES)}",
    )


def _version_name(ip_version: Any) -> str:
    """``IpVersion.v1`` → ``"Akida 1.0"``."""
    short = str(ip_version).rsplit(".", 1)[-1]
    return _AKIDA_VERSION_NAME.get(short, short)


@dataclass(frozen=True)
class MappingReport:
    """What a model uses on one Akida device.

    Parameters
    ----------
    device : str
        The device name asked for, e.g. ``"akd1000"``.
    akida_version : str
        ``"Akida 1.0"`` or ``"Akida 2.0"``.
    hw_only : bool
        Whether the whole model had to map as one hardware sequence.
    sequences : int
        Number of sequences (more than one means software runs between them).
    passes : int
        Hardware passes over all sequences (1 is best: the model fits the mesh at once).
    nps_used : int
        Neural processors used (HRC, the input-conv unit, not counted — as ``summary()``).
    nps_available : int
        Neural processors on the device mesh.
    hrc_used : bool
        Whether the input layer runs on the HRC.
    program_bytes : int
        Size of the hardware program(s).
    external_memory_bytes : int
        External memory the mapping needs (0 when everything fits on the mesh).
    components : dict[str, int]
        Component type → count, e.g. ``{"CNP1": 48, "FNP3": 1, "HRC": 1}``.
    layers : list[dict[str, Any]]
        Per layer: ``name``, ``type``, ``nps``, ``pass``.
    on_chip_latency_ms : float | None (default: None)
        Per image on a real chip; None without hardware.
    energy_mj : float | None (default: None)
        Energy per image on a real chip (mJ); None without hardware.
    note : str | None (default: None)
        Why latency or energy is missing, or how they were measured.
    """

    device: str
    akida_version: str
    hw_only: bool
    sequences: int
    passes: int
    nps_used: int
    nps_available: int
    hrc_used: bool
    program_bytes: int
    external_memory_bytes: int
    components: dict[str, int] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    on_chip_latency_ms: float | None = None
    energy_mj: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-ready data (``energy`` key for the energy)."""
        data = asdict(self)
        data["energy"] = data.pop("energy_mj")
        data["energy_unit"] = "mJ/image"
        return data

    def to_json(self) -> str:
        """Return the report as a JSON document."""
        return json.dumps(self.to_dict(), indent=2)


def map_model(
    model: akida.Model,
    device: str,
    *,
    hw_only: bool = True,
    images: np.ndarray | None = None,
) -> MappingReport:
    """Map ``model`` on the named device, read what it uses, then return it to software.

    Without a chip the mapping is done on a virtual device (``predict`` is not possible
    there), so the report has passes, NPs and program size but ``energy`` None. When
    ``akida.devices()`` lists a chip of the same kind, the model is also run on it to
    measure latency and energy per image with the library's statistics and power meter.

    Parameters
    ----------
    model : akida.Model
        A converted Akida model. It is left mapped to software (``model.map(None)``).
    device : str
        One of :data:`DEVICE_NAMES`.
    hw_only : bool (default: True)
        Require the whole model as one hardware sequence (no software between layers).
    images : np.ndarray | None (default: None)
        uint8 images for the on-chip measurement; 64 random images when None.

    Raises
    ------
    ConfigError
        If the device name is unknown.
    ModelError
        If the model targets another Akida version than the device, or does not map.
    """
    dev = make_device(device)
    model_version, device_version = _version_name(model.ip_version), _version_name(dev.ip_version)
    if model.ip_version != dev.ip_version:
        raise ModelError(
            f"the model is an {model_version} model but device {device!r} is {device_version}",
            "convert the model for that version (qana-akd1000 under "
            "cnn2snn.set_akida_version(AkidaVersion.v1) for akd1000/akd1500; qana-akida2 "
            "for akida2-*n), or pick a device of the model's version",
        )
    try:
        model.map(dev, hw_only=hw_only)
        report = _read_mapping(model, device, device_version, hw_only, len(dev.mesh.nps))
    except (RuntimeError, ValueError) as err:
        raise ModelError(
            f"the model does not map on {device!r} (hw_only={hw_only}): {err}",
            "use a device with more nodes, a smaller width/input size, or hw_only=False",
        ) from err
    finally:
        model.map(None)
    latency, energy, note = _measure_on_chip(model, dev, images)
    log.info(
        "mapped on %s: %d pass(es), %d/%d NPs, %d program bytes",
        device, report["passes"], report["nps_used"], report["nps_available"],
        report["program_bytes"],
    )
    return MappingReport(**report, on_chip_latency_ms=latency, energy_mj=energy, note=note)


def _read_mapping(
    model: akida.Model, device: str, version: str, hw_only: bool, nps_available: int
) -> dict[str, Any]:
    """Read passes, NPs and program size from a mapped model's sequences."""
    hrc_types = {akida.LayerType.InputConvolutional, akida.LayerType.InputConv2D}
    nps_used, passes, program_bytes, hrc_used = 0, 0, 0, False
    layers: list[dict[str, Any]] = []
    for sequence in model.sequences:
        if sequence.program is not None:
            program_bytes += len(sequence.program)
        for pass_index, current in enumerate(sequence.passes, start=passes + 1):
            for layer in current.layers:
                nps = 0 if layer.mapping is None else len(layer.mapping.nps)
                if layer.parameters.layer_type in hrc_types:
                    hrc_used = hrc_used or nps > 0
                else:
                    nps_used += nps
                layers.append({
                    "name": layer.name,
                    "type": str(layer.parameters.layer_type).rsplit(".", 1)[-1],
                    "nps": nps,
                    "pass": pass_index,
                })
        passes += len(sequence.passes)
    components = {
        str(kind).rsplit(".", 1)[-1]: int(count)
        for kind, count in model.component_count.items()
    }
    return {
        "device": device,
        "akida_version": version,
        "hw_only": hw_only,
        "sequences": len(model.sequences),
        "passes": passes,
        "nps_used": nps_used,
        "nps_available": nps_available,
        "hrc_used": hrc_used,
        "program_bytes": program_bytes,
        "external_memory_bytes": int(model.external_memory_size),
        "components": components,
        "layers": layers,
    }


def _measure_on_chip(
    model: akida.Model, virtual: akida.Device, images: np.ndarray | None
) -> tuple[float | None, float | None, str | None]:
    """Latency (ms/image) and energy (mJ/image) on an attached chip of the same kind."""
    attached = akida.devices()
    if not attached:
        return None, None, ENERGY_NOTE
    chip = next((d for d in attached if d.version == virtual.version), None)
    if chip is None:
        found = ", ".join(str(d.desc) for d in attached)
        return None, None, f"no attached Akida device matches {virtual.desc} (found: {found})"
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (64, *model.input_shape), dtype=np.uint8)
    try:
        if chip.soc is not None:
            chip.soc.power_measurement_enabled = True
        model.map(chip, hw_only=True)
        model.forward(images)
        stats = model.statistics
    except Exception as err:  # noqa: BLE001 - hardware/driver errors are reported, not fatal
        log.warning("on-chip measurement on %s failed: %s", chip.desc, err)
        return None, None, f"on-chip measurement on {chip.desc} failed: {err}"
    finally:
        model.map(None)
    latency = None if not stats.fps else 1000.0 / stats.fps
    energy = stats.energy
    note = f"measured on {chip.desc} over {len(images)} images"
    if energy is None:
        note += "; no power events (enable power measurement or use more images)"
    return latency, energy, note
