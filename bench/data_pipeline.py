"""Input-pipeline throughput: tf.data (decode + resize + augment) versus a plain PIL loop.

Run ``python -m bench.data_pipeline [--data PATH] [--n 512]``. Writes
``bench/results/data_pipeline.json`` and the ``## Input pipeline`` section of
``bench/RESULTS.md``. TensorFlow's thread pools are left at their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import common  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from bench._report import machine, update_section

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Input pipeline"
SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(root: Path, n: int) -> list[str]:
    """First ``n`` image files under ``root`` (sorted, recursive)."""
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"no .jpg/.png images under {root}")
    return files[:n]


def write_synthetic(folder: Path, n: int, side: int = 224, seed: int = 0) -> list[str]:
    """Write ``n`` textured skin-coloured JPEGs of ``side`` px (like the real subset)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(60, 230, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 8, (side, side, 1))
        path = folder / f"synthetic_{i:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_tf(paths: list[str], ds) -> float:
    """One full epoch through the tf.data pipeline; returns images/s."""
    start = time.perf_counter()
    count = 0
    for x, _ in ds:
        count += int(x.shape[0])
    assert count == len(paths)
    return count / (time.perf_counter() - start)


def run_pil(paths: list[str], size: int, batch: int, rng: np.random.Generator) -> float:
    """One pass of the plain loop: open, RGB, resize/crop, numpy flip, float32 batches."""
    from common.preprocess import resize_crop

    start = time.perf_counter()
    chunk: list[np.ndarray] = []
    count = 0
    for path in paths:
        with Image.open(path) as img:
            arr = resize_crop(img.convert("RGB"), size)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        chunk.append(arr)
        if len(chunk) == batch:
            count += len(np.stack(chunk).astype(np.float32))
            chunk = []
    if chunk:
        count += len(np.stack(chunk).astype(np.float32))
    assert count == len(paths)
    return count / (time.perf_counter() - start)


def render(result: dict) -> str:
    """Markdown for the RESULTS.md section."""
    m = result["machine"]
    rows = "\n".join(
        f"| {r['size']} | {r['tf_median']:.0f} | {r['tf_no_augment_median']:.0f} | "
        f"{r['pil_median']:.0f} | {r['ratio']:.2f} |"
        for r in result["rows"]
    )
    return f"""`python -m bench.data_pipeline --n {result['n']}` ({result['date']}):
{result['data']}, {result['n']} images ({result['source_side']}), batch {result['batch']}, median of
{result['repeats']} interleaved repeats.

- Machine: {m['cpu_model']}, {m['nproc']} cores (1-min load average
  {m['load_avg_1min']} at start, {result['load_avg_end']} at end), {m['ram_gb']} GB RAM,
  Python {m['python']}, TensorFlow {result['tensorflow']} with default thread pools.

| size (px) | tf.data + augment (img/s) | tf.data, no augment | PIL loop | tf+augment / PIL |
|---:|---:|---:|---:|---:|
{rows}

- tf.data = `common.augment.make_file_dataset(augment=True)`: `tf.io` decode, centre crop,
  bicubic antialiased resize (parallel map), then per batch one bilinear affine warp (flips,
  90-degree and small-angle rotation, zoom, shift) and one colour matrix (hue, saturation)
  plus contrast/brightness; prefetch, AUTOTUNE.
- PIL loop = open, convert RGB, centre crop + bicubic resize (`common.preprocess.resize_crop`),
  random numpy flip, stacked to float32 batches: single-threaded and far less augmentation.
- Raw numbers: `bench/results/data_pipeline.json`.
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help=f"image folder (default: {REAL_DATA} if present, else synthetic)")
    parser.add_argument("--n", type=int, default=512, help="images per pass (default: 512)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from common.augment import make_file_dataset

    load_start = machine()
    tmp = None
    if args.data is not None:
        paths, data = list_images(args.data, args.n), str(args.data)
    elif (REAL_DATA / "HAM10000_metadata.csv").is_file():
        paths, data = list_images(REAL_DATA, args.n), "the real HAM10000 subset"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qanafed-bench-")
        paths, data = write_synthetic(Path(tmp.name), args.n), "synthetic 224 px JPEGs"
    with Image.open(paths[0]) as img:
        source_side = f"first image {img.size[0]}x{img.size[1]} {img.format}"
    labels = np.zeros(len(paths), dtype=np.int64)

    rng = np.random.default_rng(0)
    run_pil(paths, args.sizes[0], args.batch, rng)  # warm the page cache for both contenders
    rows = []
    for size in args.sizes:
        ds = make_file_dataset(paths, labels, size, args.batch, augment=True, seed=0)
        plain = make_file_dataset(paths, labels, size, args.batch, augment=False)
        for _ in ds.take(2):  # trace the map functions once
            pass
        tf_rates, plain_rates, pil_rates = [], [], []
        for _ in range(args.repeats):
            tf_rates.append(run_tf(paths, ds))
            plain_rates.append(run_tf(paths, plain))
            pil_rates.append(run_pil(paths, size, args.batch, rng))
        row = {
            "size": size,
            "tf_images_per_s": [round(r, 1) for r in tf_rates],
            "tf_no_augment_images_per_s": [round(r, 1) for r in plain_rates],
            "pil_images_per_s": [round(r, 1) for r in pil_rates],
            "tf_median": statistics.median(tf_rates),
            "tf_no_augment_median": statistics.median(plain_rates),
            "pil_median": statistics.median(pil_rates),
        }
        row["ratio"] = row["tf_median"] / row["pil_median"]
        rows.append(row)
        print(f"{size:>4} px  tf.data {row['tf_median']:7.0f} img/s "
              f"(no augment {row['tf_no_augment_median']:7.0f})   "
              f"PIL loop {row['pil_median']:7.0f} img/s   ratio {row['ratio']:.2f}")

    result = {
        "benchmark": "data_pipeline",
        "data": data,
        "n": len(paths),
        "source_side": source_side,
        "batch": args.batch,
        "repeats": args.repeats,
        "tensorflow": tf.__version__,
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 = TensorFlow default (all visible cores)",
        },
        "machine": load_start,
        "load_avg_end": round(os.getloadavg()[0], 2),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not args.no_write:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "data_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
        update_section(RESULTS_MD, SECTION.removeprefix("## "), render(result))
        print(f"wrote {RESULTS_DIR / 'data_pipeline.json'} and {RESULTS_MD}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
