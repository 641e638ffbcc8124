"""PTQ vs QAT, PACT and SGT on one lesion-grouped split of real HAM10000 at 64 px.

Run: ``python -m bench.ptq_qat [--data PATH] [--size 64] [--epochs 15] [--qat-epochs 2]``.
Writes ``bench/results/ptq_qat.json`` and the ``## PTQ vs QAT, PACT and SGT`` section of
``bench/RESULTS.md`` (``--no-results-md`` skips the latter, e.g. for a smoke run on synthetic
data). Not a test: it records what it measures and asserts nothing.

Cost (defaults): four float trainings (plain, PACT, SGT, PACT+SGT; an SGT step costs about
three plain steps: saliency backward pass and a second forward pass) and one QAT per
(QAT arm, bit width); QAT epochs cost ~7× a float epoch on CPU (DESIGN.md §2). Estimated
from a float epoch of ~6 s on a quiet core pair at 64 px, width 0.5 (bench/RESULTS.md):
4 float stages ≈ 12 min, 4 QAT arms at 4 bits ≈ 11 min, 7 quantizations and scoring ≈ 4 min.
``--qat-bits 4 2`` adds the 2-bit QAT arms (≈ +11 min).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench._report import machine, update_section
from common.log import get_logger

log = get_logger("bench.ptq_qat")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "ham10000"
SECTION = "PTQ vs QAT, PACT and SGT"


def main(argv: list[str] | None = None) -> dict:
    """Run the study and record it; return the study dict."""
    from common.loaders import load_dataset
    from common.study import ARMS, run_study, study_table, targets_sentence
    from common.train import TrainConfig, _json_default, prepare_arrays

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--variant", default="qana-akd1000")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--qat-bits", type=int, nargs="+", default=[4])
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--balance", default="none")
    p.add_argument("--class-weighted", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sgt-mask-fraction", type=float, default=0.1)
    p.add_argument("--sgt-kl-weight", type=float, default=1.0)
    p.add_argument("--pact-alpha-init", type=float, default=6.0)
    p.add_argument("--saliency-images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "ptq_qat.json"))
    p.add_argument("--results-md", action=argparse.BooleanOptionalAction, default=True,
                   help="Update the section of bench/RESULTS.md (off for smoke runs).")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    facts = machine()
    t0 = time.time()
    cfg = TrainConfig(
        variant=args.variant, size=args.size, width=args.width, epochs=args.epochs,
        qat_epochs=args.qat_epochs, balance=args.balance, class_weighted=args.class_weighted,
        patience=args.patience, lr=args.lr, lr_schedule="cosine", seed=args.seed,
        sgt_mask_fraction=args.sgt_mask_fraction, sgt_kl_weight=args.sgt_kl_weight,
        pact_alpha_init=args.pact_alpha_init, min_agreement=0.01,
    )
    ds = load_dataset(args.data)
    arrays, _ = prepare_arrays(ds, cfg)
    study = run_study(arrays, cfg, bits=args.bits, qat_bits=args.qat_bits, arms=args.arms,
                      saliency_images=args.saliency_images)
    doc = {"machine": facts, "data": args.data, "args": vars(args),
           "wall_seconds": round(time.time() - t0, 1), "study": study}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default))
    md = [
        f"`python -m bench.ptq_qat --size {args.size} --width {args.width} --epochs "
        f"{args.epochs} --qat-epochs {args.qat_epochs} --bits {' '.join(map(str, args.bits))} "
        f"--qat-bits {' '.join(map(str, args.qat_bits))}` ({time.strftime('%Y-%m-%d %H:%M')}), "
        f"data `{Path(args.data).name}`, {study['variant']}, one lesion-grouped split (test: "
        f"{study['split']['test']} images), balance {args.balance}, class-weighted loss "
        f"{args.class_weighted}, early stopping/selection on validation only; "
        f"{doc['wall_seconds'] / 60:.0f} min in all. Machine: {facts['summary']}.",
        "",
        study_table(study),
        "",
        "- Scores: the Akida model (software backend) where the target converts the arm, "
        "else the quantized Keras model (`note`). Size: Akida `.fbz` bytes, else quantized "
        "weights at their bit widths, float rows float32 weights. Δ: balanced-accuracy points "
        "against the plain float model. Saliency: mean Spearman ρ / top-10 % overlap of "
        "vanilla-gradient maps, float stage → quantized model, on "
        f"{study['saliency']['images']} test images, explaining the float stage's class.",
        f"- {targets_sentence(study['targets'])}",
        f"- Raw numbers: `{_shown(out)}`.",
    ]
    if args.results_md:
        update_section(HERE / "RESULTS.md", SECTION, "\n".join(md))
    print("\n".join(md))
    return study


def _shown(path: Path) -> str:
    """The path relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
