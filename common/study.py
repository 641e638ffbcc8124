"""PTQ vs QAT study on one split: float, post-training quantization, QAT with/without PACT and SGT.

Every arm is scored on the same lesion-grouped test split: balanced accuracy, macro F1, model
size, CPU latency (batch 1 and 32) and the stability of input-gradient saliency from the arm's
float model to its quantized model. Float trainings are shared: one per float stage (plain,
PACT, SGT, PACT+SGT), reused by every PTQ/QAT arm built on it, so the study costs at most four
float trainings plus one QAT per (arm, bit width).

Bit widths on Akida 1.0 (cnn2snn 2.19.3, measured): weights and activations of 1, 2 or 4 bits
convert (input layer 8-bit); 8-bit weights quantize in quantizeml but cnn2snn refuses them
("can only handle weights with 1, 2 or 4 bits"), so an 8-bit arm is scored as the quantized
Keras model and marked ``convertible: false``; at 1 bit quantizeml inserts a Dequantizer after
the stem (nothing converts). Such arms still get a row, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .errors import ConfigError, DataError, ModelError
from .log import get_logger
from .metrics import classification_metrics
from .train import (
    Progress,
    SplitArrays,
    TrainConfig,
    _json_default,
    quantize_and_qat,
    train_float,
    variant_with_bits,
)
from .tta import predict_classes

log = get_logger("study")

#: Quantized arm families: post-training quantization, and QAT on each kind of float stage.
ARMS = ("ptq", "qat", "qat+pact", "qat+sgt", "qat+pact+sgt")
#: Float stage (PACT, SGT) each arm builds on.
_STAGE_OF_ARM = {
    "ptq": (False, False),
    "qat": (False, False),
    "qat+pact": (True, False),
    "qat+sgt": (False, True),
    "qat+pact+sgt": (True, True),
}
#: Bit width the study's targets are judged at (Akida 1.0's native 4 bits).
TARGET_BITS = 4
#: Allowed loss of 4-bit QAT+PACT against float, in balanced-accuracy points.
TARGET_MAX_LOSS_POINTS = 1.0
#: Weight/activation bit widths cnn2snn converts on Akida 1.0.
V1_BITS = (1, 2, 4)


def stage_name(pact: bool, sgt: bool) -> str:
    """Return a float stage's name: ``float``, ``float+pact``, ``float+sgt``, ``float+pact+sgt``."""
    return "float" + ("+pact" if pact else "") + ("+sgt" if sgt else "")


@dataclasses.dataclass
class _FloatStage:
    """A trained float stage and what every arm built on it compares against."""

    name: str
    cfg: TrainConfig
    model: Any
    saliency: np.ndarray
    targets: np.ndarray
    masks: tuple[np.ndarray, np.ndarray] | None = None


def quantized_weight_bytes(qmodel: Any) -> int:
    """Bytes of a quantizeml model's weights at their quantized bit widths.

    Kernels count at their weight quantizer's bit width, biases at their bias quantizer's
    (32 bits when it has none); BatchNorm is folded by quantizeml, so nothing else is stored.
    """
    total_bits = 0
    pairs = (("kernel", "weight_quantizer"), ("depthwise_kernel", "dw_weight_quantizer"),
             ("pointwise_kernel", "pw_weight_quantizer"), ("bias", "bias_quantizer"))
    for layer in qmodel.layers:
        for var_name, quantizer_name in pairs:
            var = getattr(layer, var_name, None)
            if var is None or not hasattr(var, "shape"):
                continue
            quantizer = getattr(layer, quantizer_name, None)
            bits = int(getattr(quantizer, "bitwidth", 32) or 32)
            total_bits += int(np.prod(var.shape)) * bits
    return -(-total_bits // 8)


def _latency(model: Any, images: np.ndarray, repeats: int) -> dict[str, float]:
    from .edge import measure_latency

    result = measure_latency(model, images, batch_sizes=(1, 32), repeats=repeats)
    return {b: round(v["ms_per_image"], 4) for b, v in result["batches"].items()}


def _check_inputs(arrays: SplitArrays, cfg: TrainConfig, arms: Sequence[str],
                  bits: Sequence[int]) -> None:
    """Refuse unknown arms, bad bit widths and images of the wrong size before any training."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"study arms {list(arms)!r} (unknown: {unknown})",
                          f"choose among {', '.join(ARMS)}")
    if not bits:
        raise ConfigError("no bit widths given", "use e.g. bits=(8, 4, 2)")
    for b in bits:
        variant_with_bits(cfg.variant, b)
    for part in ("x_train", "x_val", "x_test"):
        x = getattr(arrays, part)
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.size, cfg.size, 3) or len(x) == 0:
            raise DataError(
                f"{part} images have shape {x.shape}; the study runs at size={cfg.size}, "
                f"i.e. (N, {cfg.size}, {cfg.size}, 3) with N >= 1",
                f"prepare the arrays with the same size (prepare_arrays with size={cfg.size}), "
                "or set the config's size to the images' side",
            )


def run_study(
    arrays: SplitArrays,
    base_cfg: TrainConfig,
    *,
    bits: Sequence[int] = (8, 4, 2),
    qat_bits: Sequence[int] | None = None,
    arms: Sequence[str] = ARMS,
    progress: Progress | None = None,
    saliency_images: int = 32,
    latency_repeats: int = 3,
    test_masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run float, PTQ and QAT (± PACT, ± SGT) on one split and score every arm alike.

    Parameters
    ----------
    arrays : SplitArrays
        One split (from :func:`common.train.prepare_arrays`); test is used for scoring only.
    base_cfg : TrainConfig
        Variant, size, width, epochs, QAT epochs, learning rates, PACT/SGT hyper-parameters.
        Its own ``pact``/``sgt`` flags are ignored: each arm sets them.
    bits : Sequence[int] (default: (8, 4, 2))
        Bit widths of weights and activations for PTQ (input layer stays 8-bit).
    qat_bits : Sequence[int] | None (default: None)
        Bit widths for the QAT arms; None takes those of ``bits`` up to the variant's own
        weight bits (4 and 2 on Akida 1.0: QAT at 8 bits is not an Akida 1.0 model).
    arms : Sequence[str] (default: all of ``ARMS``)
        Arm families to run; the plain float model is always trained (it is the reference).
    progress : Progress | None (default: None)
        ``progress(stage, done, total)``: training stages (``float+pact``, ``qat+sgt@4``…)
        and ``study`` (rows done of rows planned).
    saliency_images : int (default: 32)
        Test images (a fixed seeded sample) on which saliency stability is measured.
    latency_repeats : int (default: 3)
        Timed runs per batch size (median reported).
    test_masks : tuple[np.ndarray, np.ndarray] | None (default: None)
        Lesion masks of the test images, ``(masks (N, size, size), present (N,))`` from
        :func:`common.masks.load_masks`; when any of the saliency sample has one, each row
        gains ``saliency_in_lesion`` and the study a summary of it.

    Returns
    -------
    dict[str, Any]
        ``rows`` (one per arm and bit width, float stages first; a failed arm has ``error``),
        ``targets`` (:func:`study_targets`), ``config``, ``bits``, ``qat_bits``, ``split``,
        ``class_names``, ``seconds``, ``saliency_in_lesion`` (None without masks).

    Raises
    ------
    ConfigError
        Unknown arm or invalid bit width.
    DataError
        Images not of ``base_cfg.size``.
    """
    t_start = time.perf_counter()
    bits = tuple(int(b) for b in bits)
    _check_inputs(arrays, base_cfg, arms, bits)
    info = variant_with_bits(base_cfg.variant, None)
    if qat_bits is None:
        qat_bits = tuple(b for b in bits if info.weight_bits is None or b <= info.weight_bits)
    qat_bits = tuple(int(b) for b in qat_bits)
    for b in qat_bits:
        variant_with_bits(base_cfg.variant, b)
    rng = np.random.default_rng(base_cfg.seed)
    n_sal = min(max(1, saliency_images), len(arrays.x_test))
    sal_idx = np.sort(rng.choice(len(arrays.x_test), n_sal, replace=False))
    sal_x = arrays.x_test[sal_idx]
    sal_masks = _sample_masks(test_masks, len(arrays.x_test), base_cfg.size, sal_idx)
    lat_x = arrays.x_test[:32]
    names = arrays.class_names

    plan: list[tuple[str, int]] = []
    for arm in arms:
        plan += [(arm, b) for b in (bits if arm == "ptq" else qat_bits)]
    needed = [(False, False)] + [_STAGE_OF_ARM[a] for a in arms]
    stage_keys = list(dict.fromkeys(needed))
    total = len(stage_keys) + len(plan)
    rows: list[dict[str, Any]] = []

    def tick() -> None:
        if progress is not None:
            progress("study", len(rows), total)

    stages: dict[str, _FloatStage] = {}
    for pact, sgt in stage_keys:
        stage, row = _float_stage(arrays, base_cfg, pact, sgt, sal_x, lat_x, latency_repeats,
                                  progress, sal_masks)
        stages[stage.name] = stage
        rows.append(row)
        tick()
    reference = rows[0]["balanced_accuracy"]
    for row in rows:
        row["delta_vs_float"] = _points(row["balanced_accuracy"], reference)

    for arm, b in plan:
        stage = stages[stage_name(*_STAGE_OF_ARM[arm])]
        t0 = time.perf_counter()
        try:
            row = _quantized_arm(arm, b, stage, arrays, sal_x, lat_x, latency_repeats,
                                 progress)
        except Exception as err:  # a refused bit width is a row with its reason, not a crash
            log.warning("%s at %d bits failed: %s", arm, b, err)
            row = {"arm": arm, "bits": b, "float_stage": stage.name, "kind": arm.split("+")[0],
                   "error": f"{type(err).__name__}: {err}"}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if "balanced_accuracy" in row:
            row["delta_vs_float"] = _points(row["balanced_accuracy"], reference)
        rows.append(row)
        tick()
    study = {
        "variant": base_cfg.variant,
        "size": base_cfg.size,
        "config": dataclasses.asdict(base_cfg),
        "bits": list(bits),
        "qat_bits": list(qat_bits),
        "arms": list(arms),
        "class_names": list(names),
        "split": {"train": len(arrays.y_train), "val": len(arrays.y_val),
                  "test": len(arrays.y_test)},
        "data": arrays.info,
        "saliency": {"method": "vanilla", "images": n_sal, "top_k": 0.1,
                     "target": "the float stage's predicted class"},
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    study["saliency_in_lesion"] = _in_lesion_summary(rows, sal_masks)
    study["targets"] = study_targets(rows)
    return study


def _sample_masks(
    test_masks: tuple[np.ndarray, np.ndarray] | None, n_test: int, size: int,
    sal_idx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the masks of the saliency sample, or None when none of it has one."""
    if test_masks is None:
        return None
    masks, present = (np.asarray(a, dtype=bool) for a in test_masks)
    if masks.shape != (n_test, size, size) or present.shape != (n_test,):
        raise DataError(
            f"test masks {masks.shape} and present flags {present.shape} do not fit the "
            f"{n_test} test images of {size} px",
            f"load the test split's masks at size {size} (common.masks.load_masks)",
        )
    if not present[sal_idx].any():
        return None
    return masks[sal_idx], present[sal_idx]


def _in_lesion(sal: np.ndarray, masks: tuple[np.ndarray, np.ndarray] | None
               ) -> dict[str, Any] | None:
    """Saliency-in-lesion scores of the sample's maps, without the per-image values."""
    from .saliency import saliency_in_lesion_batch

    if masks is None:
        return None
    scores = saliency_in_lesion_batch(sal, *masks)
    return {k: v for k, v in scores.items() if k != "per_image"}


def _in_lesion_summary(rows: list[dict[str, Any]],
                       masks: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any] | None:
    """``{images, skipped_no_mask, lesion_area, by_row: {arm@bits: mean}}`` or None."""
    scored = [r for r in rows if r.get("saliency_in_lesion")]
    if masks is None or not scored:
        return None
    first = scored[0]["saliency_in_lesion"]
    return {
        "images": first["n"],
        "skipped_no_mask": first["skipped_no_mask"],
        "lesion_area": first["lesion_area"],
        "by_row": {f"{r['arm']}@{r['bits']}": r["saliency_in_lesion"]["mean"] for r in scored},
    }


def _points(value: float, reference: float) -> float:
    return round(100.0 * (value - reference), 2)


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in ("balanced_accuracy", "macro_f1", "accuracy")}


def _float_stage(
    arrays: SplitArrays, base_cfg: TrainConfig, pact: bool, sgt: bool, sal_x: np.ndarray,
    lat_x: np.ndarray, repeats: int, progress: Progress | None,
    sal_masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[_FloatStage, dict[str, Any]]:
    """Train one float stage; return it and its row."""
    from .saliency import vanilla_gradients

    name = stage_name(pact, sgt)
    cfg = dataclasses.replace(base_cfg, pact=pact, sgt=sgt)
    t0 = time.perf_counter()
    log.info("study: training %s", name)
    model, record = train_float(arrays, cfg, progress, stage=name)
    metrics = classification_metrics(arrays.y_test, predict_classes(model, arrays.x_test),
                                     arrays.class_names)
    targets = predict_classes(model, sal_x)
    stage = _FloatStage(name, cfg, model, vanilla_gradients(model, sal_x, targets), targets,
                        sal_masks)
    row = {
        "arm": name, "bits": 32, "float_stage": name, "kind": "float", "pact": pact,
        "sgt": sgt, "convertible": False, "scored": "keras-float", **_scores(metrics),
        "size_bytes": int(model.count_params()) * 4, "size_kind": "float32-weights",
        "latency_ms": {"keras": _latency(model, lat_x, repeats), "akida": None},
        "saliency_stability": None,
        "saliency_in_lesion": _in_lesion(stage.saliency, sal_masks),
        "training": {"float": record},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return stage, row


def _quantized_arm(
    arm: str, bits: int, stage: _FloatStage, arrays: SplitArrays, sal_x: np.ndarray,
    lat_x: np.ndarray, repeats: int, progress: Progress | None,
) -> dict[str, Any]:
    """Quantize (and for QAT arms, train) one arm at ``bits``, convert if the target can, score."""
    from .akida_exact import convert_exact
    from .saliency import saliency_stability, vanilla_gradients

    cfg = dataclasses.replace(stage.cfg, qat_epochs=0) if arm == "ptq" else stage.cfg
    info = variant_with_bits(cfg.variant, bits)
    log.info("study: %s at %d bits on %s", arm, bits, stage.name)
    qmodel, record = quantize_and_qat(stage.model, arrays, cfg, progress, bits=bits,
                                      stage=f"{arm}@{bits}")
    ak_model, reason = None, None
    if info.akida_version == "v1" and bits not in V1_BITS:
        reason = (f"Akida 1.0 converts {', '.join(map(str, V1_BITS))}-bit weights and "
                  f"activations only (cnn2snn refuses {bits}-bit weights): quantized Keras "
                  "model scored")
    else:
        try:
            # Akida 1.0: releases PACT's clips and rescales qmodel in place (bit-exact
            # conversion); scored after it.
            ak_model = convert_exact(qmodel, info)
        except ModelError as err:
            reason = f"conversion refused: {err.problem}"
    q_pred = predict_classes(qmodel, arrays.x_test)
    q_metrics = classification_metrics(arrays.y_test, q_pred, arrays.class_names)
    row: dict[str, Any] = {
        "arm": arm, "bits": bits, "float_stage": stage.name, "kind": arm.split("+")[0],
        "pact": cfg.pact, "sgt": cfg.sgt, "convertible": ak_model is not None,
    }
    quantized_bytes = quantized_weight_bytes(qmodel)
    latency: dict[str, Any] = {"keras": _latency(qmodel, lat_x, repeats), "akida": None}
    if ak_model is not None:
        ak_pred = predict_classes(ak_model, arrays.x_test)
        ak_metrics = classification_metrics(arrays.y_test, ak_pred, arrays.class_names)
        row.update(scored="akida", **_scores(ak_metrics),
                   size_bytes=len(bytes(ak_model.to_buffer())), size_kind="akida-fbz",
                   akida_agreement=float(np.mean(ak_pred == q_pred)))
        latency["akida"] = _latency(ak_model, lat_x, repeats)
    else:
        row.update(scored="keras-quantized", **_scores(q_metrics), size_bytes=quantized_bytes,
                   size_kind="quantized-weights", note=reason)
    q_sal = vanilla_gradients(qmodel, sal_x, stage.targets)
    stability = saliency_stability(stage.saliency, q_sal, top_k=0.1)
    row.update(
        quantized=_scores(q_metrics),
        quantized_weight_bytes=quantized_bytes,
        latency_ms=latency,
        saliency_stability={"spearman": stability["spearman"]["mean"],
                            "top_k_overlap": stability["top_k_overlap"]["mean"]},
        saliency_in_lesion=_in_lesion(q_sal, stage.masks),
        training=record,
    )
    return row


def _find(rows: list[dict[str, Any]], arm: str, bits: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["arm"] == arm and r["bits"] == bits
                 and "error" not in r), None)


def study_targets(rows: list[dict[str, Any]], bits: int = TARGET_BITS) -> dict[str, Any]:
    """Judge the issue's two targets on the study rows.

    ``qat_pact_loss``: the ``qat+pact`` arm at ``bits`` loses at most
    ``TARGET_MAX_LOSS_POINTS`` balanced-accuracy points against the plain float model.
    ``sgt_stability``: float→quantized saliency Spearman at ``bits`` is higher with SGT than
    without (``qat+sgt`` vs ``qat``, and ``qat+pact+sgt`` vs ``qat+pact`` when both ran).
    ``met`` is None when the arms needed were not run.
    """
    pact = _find(rows, "qat+pact", bits)
    loss = {
        "bits": bits, "max_loss_points": TARGET_MAX_LOSS_POINTS,
        "delta_vs_float": pact["delta_vs_float"] if pact else None,
        "met": (pact["delta_vs_float"] >= -TARGET_MAX_LOSS_POINTS) if pact else None,
    }
    pairs = []
    for with_sgt, without in (("qat+sgt", "qat"), ("qat+pact+sgt", "qat+pact")):
        a, b = _find(rows, with_sgt, bits), _find(rows, without, bits)
        if a is None or b is None:
            continue
        rho_a, rho_b = a["saliency_stability"]["spearman"], b["saliency_stability"]["spearman"]
        pairs.append({"with_sgt": with_sgt, "without": without, "spearman_with": rho_a,
                      "spearman_without": rho_b,
                      "improved": None if rho_a is None or rho_b is None else rho_a > rho_b})
    verdicts = [p["improved"] for p in pairs if p["improved"] is not None]
    return {
        "qat_pact_loss": loss,
        "sgt_stability": {"bits": bits, "pairs": pairs,
                          "met": all(verdicts) if verdicts else None},
    }


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def study_table(study: dict[str, Any]) -> str:
    """Return the study as a markdown table (one row per arm and bit width)."""
    lines = [
        "| arm | bits | float stage | Akida | bal-acc | macro-F1 | Δ vs float (pts) | size (kB) "
        "| Keras ms/img b1 / b32 | Akida ms/img b1 / b32 | saliency ρ / top-10 % | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in study["rows"]:
        if "error" in r:
            lines.append(f"| {r['arm']} | {r['bits']} | {r['float_stage']} | – | – | – | – | – "
                         f"| – | – | – | {r['error'][:160]} |")
            continue
        lat = r["latency_ms"]

        def ms(kind: str, lat: dict[str, Any] = lat) -> str:
            return "–" if lat.get(kind) is None else (
                f"{lat[kind]['1']:.2f} / {lat[kind]['32']:.2f}")

        sal = r["saliency_stability"]
        sal_txt = "–" if sal is None else (
            f"{_fmt(sal['spearman'])} / {_fmt(sal['top_k_overlap'], '.2f')}")
        size = f"{r['size_bytes'] / 1000:.1f} ({r['size_kind']})"
        akida = "yes" if r["convertible"] else "no"
        note = r.get("note") or ""
        lines.append(
            f"| {r['arm']} | {r['bits']} | {r['float_stage']} | {akida} | "
            f"{r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} | {r['delta_vs_float']:+.1f} | "
            f"{size} | {ms('keras')} | {ms('akida')} | {sal_txt} | {note[:120]} |"
        )
    return "\n".join(lines)


def targets_sentence(targets: dict[str, Any]) -> str:
    """One sentence stating whether each target was met."""
    loss, sgt = targets["qat_pact_loss"], targets["sgt_stability"]
    if loss["met"] is None:
        first = f"the {loss['bits']}-bit QAT+PACT arm did not run"
    else:
        first = (f"{loss['bits']}-bit QAT+PACT is {loss['delta_vs_float']:+.1f} balanced-accuracy "
                 f"points against float (target ≥ −{loss['max_loss_points']:g}: "
                 f"{'met' if loss['met'] else 'not met'})")
    if sgt["met"] is None:
        second = "SGT's effect on saliency stability was not measured"
    else:
        pairs = "; ".join(f"{p['with_sgt']} {_fmt(p['spearman_with'])} vs {p['without']} "
                          f"{_fmt(p['spearman_without'])}" for p in sgt["pairs"])
        second = (f"float→quantized saliency Spearman with SGT: {pairs} "
                  f"(target: higher with SGT: {'met' if sgt['met'] else 'not met'})")
    return f"Targets: {first}; {second}."


def in_lesion_sentence(study: dict[str, Any]) -> str | None:
    """One sentence of the saliency-in-lesion scores per row, or None without masks."""
    summary = study.get("saliency_in_lesion")
    if not summary:
        return None
    scores = ", ".join(f"{row} {_fmt(mean, '.2f')}" for row, mean in summary["by_row"].items())
    return (
        f"Saliency in lesion (share of vanilla-gradient mass inside the lesion mask, "
        f"{summary['images']} test images with a mask): {scores}; a map with no preference "
        f"scores the lesion's area ({_fmt(summary['lesion_area'], '.2f')}), and a score near or "
        "below it means the model looks at the skin around the lesion: a warning."
    )


def write_study(out: str | Path, study: dict[str, Any], split: Any = None) -> Path:
    """Write ``out/study.json`` and ``out/study.md`` (and ``split.json``) atomically.

    A temporary sibling folder is filled, then renamed; an existing ``out`` is replaced only
    once the new one is complete.

    Returns
    -------
    Path
        The output folder.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "study.json").write_text(json.dumps(study, indent=2, default=_json_default))
        md = [
            f"# PTQ vs QAT study: {study['variant']} at {study['size']} px",
            "",
            f"Test split: {study['split']['test']} images; balanced accuracy and macro F1 of "
            "the Akida model where the target converts the arm, else of the quantized Keras "
            "model; saliency ρ = mean Spearman correlation of vanilla-gradient maps, float "
            f"stage → quantized, on {study['saliency']['images']} test images.",
            "",
            study_table(study),
            "",
            targets_sentence(study["targets"]),
            "",
        ]
        in_lesion = in_lesion_sentence(study)
        if in_lesion:
            md += [in_lesion, ""]
        (tmp / "study.md").write_text("\n".join(md))
        if split is not None:
            split.save(tmp / "split.json")
    log.info("wrote %s", out)
    return out
