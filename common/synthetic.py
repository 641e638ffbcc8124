"""Synthetic dermoscopy (and GI-endoscopy) images: hard-but-learnable stand-ins for real data.

The generator draws every random parameter up front from one seeded ``numpy`` generator and then
renders images in fixed-size chunks with vectorised array arithmetic, so the same arguments give
byte-identical images. Class signal lives in colour *and* in shape (border irregularity, asymmetry,
edge sharpness) and dermoscopic structures (network, dots, globules, streaks, veil, vessels,
lacunae, milia, ridges, scale); every structure shows up in more than one class and the colours
overlap, so a colour-statistics classifier is clearly beaten by a small CNN. Nuisances: skin tone,
mottling, hair, vignette, per-site colour casts and re-shots (2-3 images of one lesion with a small
rotation, shift and brightness change), so grouping by lesion matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from .classes import HAM_CLASSES, HAM_PRIOR
from .dataset import LesionDataset
from .errors import ConfigError
from .log import get_logger

__all__ = ["KVASIR_CLASSES", "SYNTHETIC_MODES", "make_synthetic"]

log = get_logger("data.synthetic")

#: Kvasir v2 class folder names, in label-index order.
KVASIR_CLASSES: tuple[str, ...] = (
    "dyed-lifted-polyps",
    "dyed-resection-margins",
    "esophagitis",
    "normal-cecum",
    "normal-pylorus",
    "normal-z-line",
    "polyps",
    "ulcerative-colitis",
)

#: Image modalities ``make_synthetic`` can draw.
SYNTHETIC_MODES: tuple[str, ...] = ("dermoscopy", "endoscopy")

#: Images per lesion (re-shots) and how often each count occurs.
_SHOTS = np.array([1, 2, 3])
_SHOT_PROB = np.array([0.7, 0.2, 0.1])

#: Images rendered per vectorised chunk (fixed so that output never depends on memory).
_CHUNK = 256

#: Blob slots per lesion (globules, dots, lacunae, nests, milia share them) and vessel segments.
_BLOBS = 8
_VESSELS = 3
_HAIRS = 3

# Dermoscopic structures. Every structure appears in several classes (with different rates).
_FEATURES: tuple[str, ...] = (
    "network",  # pigment network (regular or atypical)
    "globules",  # brown globules
    "black_dots",  # peripheral black dots
    "streaks",  # radial streaks / pseudopods at the border
    "veil",  # blue-white veil / blue-grey blotch
    "white_patch",  # regression / scar-like white area (central in df)
    "vessels",  # red vessel segments (arborizing / linear)
    "lacunae",  # red-purple lacunae
    "blue_nests",  # blue-grey ovoid nests
    "milia",  # milia-like cysts
    "ridges",  # cerebriform ridges and fissures
    "scale",  # white keratin scale
)
_BLOB_FEATURES: tuple[str, ...] = ("globules", "black_dots", "lacunae", "blue_nests", "milia")

#: Body colour continuum: pink (no pigment) to dark brown, optionally pulled towards red-purple.
_PINK = np.array([196.0, 138.0, 126.0])
_BROWN = np.array([92.0, 60.0, 46.0])
_RED = np.array([160.0, 48.0, 72.0])

#: Per blob kind: colour (RGB 0-255, or ``None`` for a darker shade of the body), radius range and
#: the ring (min, max distance from the centre) it sits in, in lesion-radius units.
_BLOB_LOOK: dict[
    str, tuple[tuple[float, float, float] | None, tuple[float, float], tuple[float, float]]
] = {
    "globules": (None, (0.12, 0.18), (0.0, 0.75)),
    "black_dots": (None, (0.07, 0.11), (0.55, 0.95)),
    "lacunae": ((140, 28, 62), (0.18, 0.28), (0.0, 0.65)),
    "blue_nests": ((85, 98, 135), (0.13, 0.2), (0.1, 0.8)),
    "milia": ((238, 228, 200), (0.08, 0.12), (0.0, 0.75)),
}
#: Body-colour factor of the pigmented blob kinds.
_BLOB_SHADE = {"globules": 0.5, "black_dots": 0.25}


@dataclass(frozen=True)
class _Look:
    """How one diagnosis tends to look.

    Ranges overlap between classes on purpose, and every colour cue (dark, white, blue, red) is
    shared by at least two classes: what tells classes apart is mostly shape and arrangement.
    """

    pigment: tuple[float, float]  # body colour: 0 pink .. 1 dark brown
    redness: tuple[float, float]  # pull of the body colour towards red-purple
    radius: tuple[float, float]  # lesion radius, fraction of the half image width
    irregular: tuple[float, float]  # border harmonic amplitude
    asymmetry: tuple[float, float]  # first-harmonic (off-centre) border amplitude
    softness: tuple[float, float]  # border blur, lesion-radius units
    blotch: float  # multicomponent colour variegation
    atypia: float  # pigment-network distortion
    centred_patch: bool  # white patch at the centre (df) rather than anywhere
    features: dict[str, float]  # probability that a lesion shows each structure


_DERMOSCOPY_LOOKS: dict[str, _Look] = {
    "akiec": _Look(
        pigment=(0.0, 0.5), redness=(0.1, 0.4), radius=(0.49, 0.83), irregular=(0.05, 0.13),
        asymmetry=(0.05, 0.18), softness=(0.10, 0.2), blotch=0.12, atypia=0.2,
        centred_patch=False,
        features={"scale": 0.8, "vessels": 0.45, "white_patch": 0.15, "network": 0.1,
                  "globules": 0.1, "ridges": 0.05},
    ),
    "bcc": _Look(
        pigment=(0.0, 0.55), redness=(0.0, 0.3), radius=(0.47, 0.81), irregular=(0.06, 0.14),
        asymmetry=(0.05, 0.2), softness=(0.05, 0.12), blotch=0.12, atypia=0.2,
        centred_patch=False,
        features={"vessels": 0.8, "blue_nests": 0.75, "white_patch": 0.25, "veil": 0.1,
                  "globules": 0.15, "scale": 0.1},
    ),
    "bkl": _Look(
        pigment=(0.25, 0.85), redness=(0.0, 0.1), radius=(0.49, 0.86), irregular=(0.04, 0.1),
        asymmetry=(0.03, 0.12), softness=(0.01, 0.04), blotch=0.1, atypia=0.1,
        centred_patch=False,
        features={"ridges": 0.7, "milia": 0.6, "scale": 0.3, "network": 0.15, "globules": 0.1,
                  "vessels": 0.1, "blue_nests": 0.05},
    ),
    "df": _Look(
        pigment=(0.25, 0.75), redness=(0.0, 0.2), radius=(0.43, 0.72), irregular=(0.01, 0.05),
        asymmetry=(0.0, 0.08), softness=(0.1, 0.2), blotch=0.06, atypia=0.05,
        centred_patch=True,
        features={"white_patch": 0.9, "network": 0.6, "vessels": 0.1, "globules": 0.1,
                  "scale": 0.05},
    ),
    "mel": _Look(
        pigment=(0.4, 1.0), redness=(0.0, 0.15), radius=(0.55, 0.88), irregular=(0.08, 0.2),
        asymmetry=(0.15, 0.35), softness=(0.03, 0.12), blotch=0.3, atypia=0.3,
        centred_patch=False,
        features={"network": 0.55, "black_dots": 0.5, "streaks": 0.5, "veil": 0.45,
                  "white_patch": 0.3, "globules": 0.3, "vessels": 0.15, "blue_nests": 0.1,
                  "scale": 0.05},
    ),
    "nv": _Look(
        pigment=(0.3, 0.95), redness=(0.0, 0.1), radius=(0.47, 0.81), irregular=(0.01, 0.05),
        asymmetry=(0.0, 0.1), softness=(0.04, 0.1), blotch=0.08, atypia=0.05,
        centred_patch=False,
        features={"network": 0.75, "globules": 0.5, "milia": 0.1, "black_dots": 0.05,
                  "streaks": 0.05, "veil": 0.1, "white_patch": 0.05, "ridges": 0.05,
                  "vessels": 0.05},
    ),
    "vasc": _Look(
        pigment=(0.0, 0.5), redness=(0.2, 0.65), radius=(0.43, 0.73), irregular=(0.02, 0.06),
        asymmetry=(0.0, 0.1), softness=(0.02, 0.06), blotch=0.1, atypia=0.05,
        centred_patch=False,
        features={"lacunae": 0.95, "vessels": 0.2, "veil": 0.15, "white_patch": 0.15,
                  "blue_nests": 0.05},
    ),
}


def make_synthetic(
    n: int = 600,
    size: int = 64,
    num_sites: int = 3,
    seed: int = 0,
    mode: str = "dermoscopy",
) -> LesionDataset:
    """Draw a synthetic, in-memory dataset with lesion ids, sites and re-shots.

    Parameters
    ----------
    n : int (default: 600)
        Number of images.
    size : int (default: 64)
        Image height and width in pixels (at least 16).
    num_sites : int (default: 3)
        Number of sites (``"site-0"`` ...), each with its own colour cast and brightness.
    seed : int (default: 0)
        Seed; the same arguments give byte-identical images.
    mode : str (default: "dermoscopy")
        ``"dermoscopy"`` (HAM10000 classes and class prior) or ``"endoscopy"`` (the 8 Kvasir v2
        classes, roughly balanced).

    Returns
    -------
    LesionDataset
        Format ``"synthetic"``, uint8 images ``(n, size, size, 3)``, ids ``SYN_IMG_000123`` and
        lesion ids ``SYN_000123``, empty metadata.

    Raises
    ------
    ConfigError
        If ``mode`` is unknown, ``n`` is smaller than the number of classes, ``size < 16`` or
        ``num_sites`` is not between 1 and ``n``.
    """
    if mode not in SYNTHETIC_MODES:
        raise ConfigError(
            f"unknown synthetic mode {mode!r}", f"use one of {', '.join(SYNTHETIC_MODES)}"
        )
    class_names = HAM_CLASSES if mode == "dermoscopy" else KVASIR_CLASSES
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < len(class_names):
        raise ConfigError(
            f"synthetic n={n!r} is fewer images than the {len(class_names)} {mode} classes",
            f"ask for at least {len(class_names)} images (a few hundred for training)",
        )
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 16:
        raise ConfigError(f"synthetic image size={size!r} is too small", "use size >= 16 (e.g. 32)")
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) or not (
        1 <= num_sites <= n
    ):
        raise ConfigError(
            f"synthetic num_sites={num_sites!r} is not between 1 and n={n}",
            "use a small positive number of sites, e.g. 3",
        )
    n, size, num_sites = int(n), int(size), int(num_sites)
    rng = np.random.default_rng(seed)

    if mode == "dermoscopy":
        prior = np.array([HAM_PRIOR[c] for c in class_names])
    else:
        prior = np.full(len(class_names), 1.0 / len(class_names))
    counts = _class_counts(n, prior, minimum=min(2, n // len(class_names)))
    lesion_label, lesion_shots = _group_into_lesions(counts, rng)
    num_lesions = len(lesion_label)
    lesion_site = _assign_sites(lesion_label, len(class_names), num_sites, rng)

    # Image order is shuffled so re-shots of one lesion are not neighbours.
    image_lesion = rng.permutation(np.repeat(np.arange(num_lesions), lesion_shots))
    labels = lesion_label[image_lesion].astype(np.int64)
    casts = _site_casts(num_sites, rng)

    draw = _draw_dermoscopy if mode == "dermoscopy" else _draw_endoscopy
    params = draw(lesion_label, image_lesion, rng)
    params["cast"] = casts[lesion_site[image_lesion]] * rng.uniform(0.88, 1.12, (n, 1))
    render = _render_dermoscopy if mode == "dermoscopy" else _render_endoscopy

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        chunk = {k: v[sl] for k, v in params.items()}
        images[sl] = render(chunk, size, rng)

    digits = max(6, len(str(max(n, num_lesions))))
    log.debug(
        "synthetic %s: %d images of %d lesions at %d px over %d sites (seed %d)",
        mode, n, num_lesions, size, num_sites, seed,
    )
    return LesionDataset(
        images=images,
        labels=labels,
        class_names=class_names,
        lesion_ids=np.array([f"SYN_{i:0{digits}d}" for i in image_lesion]),
        sites=np.array([f"site-{s}" for s in lesion_site[image_lesion]]),
        image_ids=np.array([f"SYN_IMG_{i:0{digits}d}" for i in range(n)]),
        metadata=(),
        format="synthetic",
        root=None,
    )


# --------------------------------------------------------------------------- allocation


def _class_counts(n: int, prior: np.ndarray, minimum: int) -> np.ndarray:
    """Split ``n`` images over classes by largest remainder, at least ``minimum`` each."""
    raw = n * prior / prior.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    for c in np.flatnonzero(counts < minimum):
        need = minimum - counts[c]
        counts[np.argmax(counts)] -= need
        counts[c] += need
    return counts


def _group_into_lesions(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Group each class's images into lesions of 1-3 images; return label and shots per lesion."""
    labels, shots = [], []
    for c, count in enumerate(counts.tolist()):
        sizes = rng.choice(_SHOTS, size=count, p=_SHOT_PROB)
        cut = int(np.searchsorted(np.cumsum(sizes), count)) + 1
        sizes = sizes[:cut]
        sizes[-1] -= sizes.sum() - count
        labels.append(np.full(len(sizes), c))
        shots.append(sizes)
    label, shot = np.concatenate(labels), np.concatenate(shots)
    order = rng.permutation(len(label))
    return label[order], shot[order]


def _assign_sites(
    lesion_label: np.ndarray, num_classes: int, num_sites: int, rng: np.random.Generator
) -> np.ndarray:
    """Site per lesion with a moderate, seeded class skew; every site gets a lesion if it can."""
    p_site = rng.dirichlet(np.full(num_sites, 2.0), size=num_classes)
    cum = np.cumsum(p_site[lesion_label], axis=1)
    site = (rng.random((len(lesion_label), 1)) > cum).sum(axis=1).clip(0, num_sites - 1)
    for s in range(num_sites):
        counts = np.bincount(site, minlength=num_sites)
        if counts[s] == 0 and counts.max() > 1:
            site[rng.choice(np.flatnonzero(site == np.argmax(counts)))] = s
    return site


def _site_casts(num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Per-site RGB gain: a colour cast times a brightness, shape ``(num_sites, 3)``."""
    cast = 1.0 + rng.uniform(-0.18, 0.18, (num_sites, 3))
    return cast * rng.uniform(0.8, 1.12, (num_sites, 1))


# --------------------------------------------------------------------------- shared drawing


def _pose(
    lesion: np.ndarray, image_lesion: np.ndarray, rng: np.random.Generator, spread: float
) -> dict[str, np.ndarray]:
    """Lesion pose plus a small per-image re-shot change (rotation, shift)."""
    num_lesions, n = len(lesion), len(image_lesion)
    angle = rng.uniform(0, 2 * np.pi, num_lesions)[image_lesion] + rng.normal(0, 0.15, n)
    centre = rng.uniform(-spread, spread, (num_lesions, 2))[image_lesion]
    return {"angle": angle, "centre": centre + rng.normal(0, 0.03, (n, 2))}


def _smooth_noise(rng: np.random.Generator, batch: int, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise ``(batch, size, size)``: a ``cells``² grid, bilinear."""
    coarse = rng.standard_normal((batch, cells, cells), dtype=np.float32)
    up = _upsampler(size, cells)
    return up @ coarse @ up.T


def _upsampler(size: int, cells: int) -> np.ndarray:
    """Linear-interpolation matrix ``(size, cells)`` mapping a coarse axis onto pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.minimum(np.floor(pos).astype(np.int64), cells - 2)
    frac = pos - low
    matrix = np.zeros((size, cells), dtype=np.float32)
    matrix[np.arange(size), low] = 1 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], shaped ``(1, size, size)``."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return xx[None], yy[None]


def _local(
    p: dict[str, np.ndarray], xx: np.ndarray, yy: np.ndarray, scale: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and scale image coordinates into the lesion frame."""
    cos = np.cos(p["angle"]).astype(np.float32)[:, None, None]
    sin = np.sin(p["angle"]).astype(np.float32)[:, None, None]
    dx = xx - p["centre"][:, 0, None, None].astype(np.float32)
    dy = yy - p["centre"][:, 1, None, None].astype(np.float32)
    s = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)
    return (dx * cos + dy * sin) / s, (dy * cos - dx * sin) / s


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[float, ...]) -> None:
    """In place: ``img = img * (1 - alpha) + colour * alpha``.

    ``img`` is channels-first ``(B, 3, H, W)`` in 0-1 (a channel-last innermost axis of length 3
    makes numpy broadcasting ~20x slower), ``alpha`` is ``(B, H, W)``, ``colour`` 0-255 RGB for
    all images or per image.
    """
    col = np.asarray(colour, dtype=np.float32).reshape(-1, 3, 1, 1) / 255.0
    img += alpha[:, None] * (col - img)


def _blend_rows(
    img: np.ndarray, rows: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[float, ...]
) -> None:
    """Like `_blend`, on the images ``img[rows]`` only (``alpha`` covers just those rows)."""
    part = img[rows]
    _blend(part, alpha, colour)
    img[rows] = part


def _pow8(x: np.ndarray) -> np.ndarray:
    """``x ** 8`` by squaring (float32 ``power`` is several times slower)."""
    x = x * x
    x *= x
    x *= x
    return x


def _col(values: np.ndarray) -> np.ndarray:
    """Column of a per-image parameter for broadcasting over ``(B, H, W)``."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _finish(
    img: np.ndarray, p: dict[str, np.ndarray], rng: np.random.Generator, xx: np.ndarray,
    yy: np.ndarray,
) -> np.ndarray:
    """Hair, site cast, vignette and sensor noise; returns uint8 ``(B, H, W, 3)``."""
    size = img.shape[-1]
    for h in range(_HAIRS):
        if not (r := np.flatnonzero(p["hair_on"][:, h])).size:
            continue
        cos, sin = _col(np.cos(p["hair_dir"][r, h])), _col(np.sin(p["hair_dir"][r, h]))
        dx, dy = xx - _col(p["hair_pos"][r, h, 0]), yy - _col(p["hair_pos"][r, h, 1])
        along = dx * cos + dy * sin
        across = dy * cos - dx * sin + _col(p["hair_bend"][r, h]) * along**2
        alpha = np.exp(-((across * size / 1.2) ** 2)) * 0.85
        _blend_rows(img, r, alpha, p["hair_colour"][r])
    img *= np.asarray(p["cast"], dtype=np.float32)[:, :, None, None]
    radius = np.sqrt(xx**2 + yy**2)
    vignette = np.clip((radius - 0.75) / 0.7, 0, 1) ** 2
    img *= (1 - _col(p["vignette"]) * vignette)[:, None]
    img += (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.04  # sensor noise, sd ~0.012
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def _draw_nuisance(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image hair and vignette."""
    return {
        "hair_on": (rng.random((n, 1)) < 0.35) & (rng.random((n, _HAIRS)) < 0.6),
        "hair_pos": rng.uniform(-0.8, 0.8, (n, _HAIRS, 2)),
        "hair_dir": rng.uniform(0, np.pi, (n, _HAIRS)),
        "hair_bend": rng.normal(0, 0.4, (n, _HAIRS)),
        "hair_colour": rng.uniform(20, 70, (n, 1)) * np.array([[1.0, 0.8, 0.7]]),
        "vignette": rng.uniform(0, 0.6, n) * (rng.random(n) < 0.6),
    }


# --------------------------------------------------------------------------- dermoscopy


def _draw_dermoscopy(
    lesion_label: np.ndarray, image_lesion: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Draw every dermoscopy parameter (per lesion, then per image) in a fixed order."""
    looks = [_DERMOSCOPY_LOOKS[c] for c in HAM_CLASSES]
    num_lesions, n = len(lesion_label), len(image_lesion)

    def table(attr: str) -> np.ndarray:
        """One look attribute for every class, stacked (ranges give shape ``(classes, 2)``)."""
        return np.array([getattr(look, attr) for look in looks], dtype=np.float64)

    def per_lesion(attr: str) -> np.ndarray:
        """Uniform draw per lesion within its class's range of ``attr``."""
        bounds = table(attr)[lab]
        return rng.uniform(bounds[:, 0], bounds[:, 1])

    lab = lesion_label
    pigment = per_lesion("pigment")[:, None]
    redness = per_lesion("redness")[:, None]
    colour = _PINK + pigment * (_BROWN - _PINK)
    colour += redness * (_RED - colour)
    colour *= rng.uniform(0.85, 1.15, (num_lesions, 1))
    colour *= 1 + rng.normal(0, 0.05, (num_lesions, 3))
    feature_p = np.array([[look.features.get(f, 0.0) for f in _FEATURES] for look in looks])
    present = rng.random((num_lesions, len(_FEATURES))) < feature_p[lab]
    strength = rng.uniform(0.55, 1.0, (num_lesions, len(_FEATURES))) * present

    # Blobs: each slot takes a kind among the lesion's present blob structures.
    blob_cols = [_FEATURES.index(f) for f in _BLOB_FEATURES]
    blob_present = present[:, blob_cols]
    pick = rng.random((num_lesions, _BLOBS, len(_BLOB_FEATURES))) * blob_present[:, None, :]
    kind = pick.argmax(axis=2)
    blob_on = pick.max(axis=2) > 0
    blob_on &= rng.random((num_lesions, _BLOBS)) < 0.75
    blob_strength = strength[:, blob_cols][np.arange(num_lesions)[:, None], kind] * blob_on
    looks_b = [_BLOB_LOOK[f] for f in _BLOB_FEATURES]
    fixed = np.array([b[0] or (0, 0, 0) for b in looks_b], dtype=np.float64)[kind]
    shade = np.array([_BLOB_SHADE.get(f, 0.0) for f in _BLOB_FEATURES])[kind][..., None]
    blob_colour = np.where(shade > 0, colour[:, None, :] * shade, fixed)
    r_lo, r_hi = (np.array([b[1][i] for b in looks_b])[kind] for i in (0, 1))
    d_lo, d_hi = (np.array([b[2][i] for b in looks_b])[kind] for i in (0, 1))
    blob_radius = rng.uniform(r_lo, r_hi)
    blob_dist = rng.uniform(d_lo, d_hi)
    blob_angle = rng.uniform(0, 2 * np.pi, (num_lesions, _BLOBS))

    centred = np.array([look.centred_patch for look in looks])[lab]
    patch_pos = rng.uniform(-0.45, 0.45, (num_lesions, 2)) * np.where(centred, 0.25, 1.0)[:, None]

    lesion = {
        "radius": per_lesion("radius"),
        "irregular": per_lesion("irregular")[:, None]
        * rng.standard_normal((num_lesions, 5))
        / np.sqrt(np.arange(1, 6)),
        "phase": rng.uniform(0, 2 * np.pi, (num_lesions, 5)),
        "asymmetry": per_lesion("asymmetry"),
        "elong": rng.uniform(0, 0.18, num_lesions),
        "softness": per_lesion("softness"),
        "blotch": table("blotch")[lab] * rng.uniform(0.5, 1.5, num_lesions),
        "atypia": table("atypia")[lab] * rng.uniform(0.5, 1.5, num_lesions),
        "gradient": rng.uniform(-0.35, 0.35, num_lesions),
        "colour": colour,
        "strength": strength,
        "net_freq": rng.uniform(1.6, 2.3, num_lesions),
        "net_dir": rng.uniform(0, np.pi, num_lesions),
        "net_phase": rng.uniform(0, 2 * np.pi, (num_lesions, 2)),
        "streak_count": rng.integers(7, 13, num_lesions),
        "streak_phase": rng.uniform(0, 2 * np.pi, num_lesions),
        "veil_pos": rng.uniform(-0.45, 0.45, (num_lesions, 2)),
        "veil_size": rng.uniform(0.35, 0.55, num_lesions),
        "patch_pos": patch_pos,
        "patch_size": rng.uniform(0.25, 0.4, num_lesions),
        "vessel_pos": rng.uniform(-0.5, 0.5, (num_lesions, _VESSELS, 2)),
        "vessel_dir": rng.uniform(0, np.pi, (num_lesions, _VESSELS)),
        "vessel_len": rng.uniform(0.35, 0.7, (num_lesions, _VESSELS)),
        "vessel_wave": rng.uniform(0, 2 * np.pi, (num_lesions, _VESSELS)),
        "ridge_freq": rng.uniform(1.6, 2.2, num_lesions),
        "ridge_dir": rng.uniform(0, np.pi, num_lesions),
        "blob_strength": blob_strength,
        "blob_colour": blob_colour,
        "blob_radius": blob_radius,
        "blob_u": blob_dist * np.cos(blob_angle),
        "blob_v": blob_dist * np.sin(blob_angle),
        "skin": rng.uniform(0.66, 1.04, (num_lesions, 1)) * np.array([[232, 188, 166]])
        * (1 + rng.normal(0, 0.03, (num_lesions, 3))),
    }
    params = {k: v[image_lesion] for k, v in lesion.items()}
    params.update(_pose(lesion_label, image_lesion, rng, spread=0.15))
    params.update(_draw_nuisance(n, rng))
    return params


def _render_dermoscopy(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one chunk of dermoscopy images from their parameters."""
    batch = len(p["radius"])
    xx, yy = _grid(size)
    mottle = _smooth_noise(rng, batch, size, 5)
    grain = _smooth_noise(rng, batch, size, max(4, size // 3))

    skin = p["skin"].astype(np.float32)[:, :, None, None] / 255.0
    img = skin * (1 + 0.04 * mottle)[:, None]

    u, v = _local(p, xx, yy, p["radius"])
    u *= 1 + _col(p["elong"])
    rho = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    border = 1 + _col(p["asymmetry"]) * np.cos(theta - _col(p["phase"][:, 0]))
    for k in range(5):
        border += _col(p["irregular"][:, k]) * np.cos((k + 2) * theta + _col(p["phase"][:, k]))
    inside = expit((border - rho) / _col(p["softness"]))

    # Body: base colour, a radial gradient and multicomponent variegation.
    shade = 1 + _col(p["gradient"]) * (rho - 0.5) + _col(p["blotch"]) * mottle
    body = p["colour"].astype(np.float32)[:, :, None, None] / 255.0 * shade[:, None]
    img += inside[:, None] * (body - img)

    # Each structure is computed only on the images (rows) that show it.
    def rows_with(name: str) -> np.ndarray:
        return np.flatnonzero(p["strength"][:, _FEATURES.index(name)] > 0)

    def strength(name: str, rows: np.ndarray) -> np.ndarray:
        return _col(p["strength"][rows, _FEATURES.index(name)])

    # Pigment network: lattice lines, warped when atypical, fading towards the border.
    if (r := rows_with("network")).size:
        cos, sin = np.cos(_col(p["net_dir"][r])), np.sin(_col(p["net_dir"][r]))
        nu, nv = u[r] * cos + v[r] * sin, v[r] * cos - u[r] * sin
        warp = _col(p["atypia"][r])
        nu += warp * np.sin(3 * nv + _col(p["net_phase"][r, 0]))
        nv += warp * np.sin(3 * nu + _col(p["net_phase"][r, 1]))
        freq = _col(p["net_freq"][r]) * np.pi
        lines = np.maximum(_pow8(np.cos(freq * nu)), _pow8(np.cos(freq * nv)))
        alpha = lines * inside[r] * strength("network", r) * 0.75
        _blend_rows(img, r, alpha, p["colour"][r] * 0.45)

    # Cerebriform ridges.
    if (r := rows_with("ridges")).size:
        cos, sin = np.cos(_col(p["ridge_dir"][r])), np.sin(_col(p["ridge_dir"][r]))
        along, across = u[r] * cos + v[r] * sin, v[r] * cos - u[r] * sin
        wave = np.cos(np.pi * _col(p["ridge_freq"][r]) * along + 1.6 * np.sin(2.5 * across)) ** 6
        _blend_rows(img, r, wave * inside[r] * strength("ridges", r) * 0.7, p["colour"][r] * 0.55)

    # Blue-white veil and white (regression / scar) patch.
    for name, pos, spread, colour in (
        ("veil", "veil_pos", "veil_size", (108, 122, 160)),
        ("white_patch", "patch_pos", "patch_size", (236, 222, 214)),
    ):
        if (r := rows_with(name)).size:
            d2 = (u[r] - _col(p[pos][r, 0])) ** 2 + (v[r] - _col(p[pos][r, 1])) ** 2
            alpha = np.exp(-d2 / _col(p[spread][r]) ** 2) * inside[r] * strength(name, r) * 0.85
            _blend_rows(img, r, alpha, colour)

    # Blobs: globules, black dots, lacunae, blue-grey nests, milia-like cysts.
    for b in range(_BLOBS):
        if not (r := np.flatnonzero(p["blob_strength"][:, b] > 0)).size:
            continue
        d2 = (u[r] - _col(p["blob_u"][r, b])) ** 2 + (v[r] - _col(p["blob_v"][r, b])) ** 2
        alpha = np.exp(-((d2 / _col(p["blob_radius"][r, b]) ** 2) ** 2))
        alpha *= _col(p["blob_strength"][r, b]) * inside[r]
        _blend_rows(img, r, alpha, p["blob_colour"][r, b])

    # Vessel segments, gently wavy.
    if (r := rows_with("vessels")).size:
        for s in range(_VESSELS):
            cos, sin = np.cos(_col(p["vessel_dir"][r, s])), np.sin(_col(p["vessel_dir"][r, s]))
            du, dv = u[r] - _col(p["vessel_pos"][r, s, 0]), v[r] - _col(p["vessel_pos"][r, s, 1])
            along, across = du * cos + dv * sin, dv * cos - du * sin
            across += 0.08 * np.sin(9 * along + _col(p["vessel_wave"][r, s]))
            extent = np.clip(1.5 - np.abs(along) / _col(p["vessel_len"][r, s]), 0, 1)
            alpha = np.exp(-((across / 0.1) ** 2)) * extent * inside[r] * 0.9
            _blend_rows(img, r, alpha * strength("vessels", r), (168, 38, 48))

    # Radial streaks straddling the border.
    if (r := rows_with("streaks")).size:
        phase = _col(p["streak_count"][r]) * theta[r] + _col(p["streak_phase"][r])
        rays = (0.5 + 0.5 * np.cos(phase)) ** 6
        ring = np.exp(-(((rho[r] - border[r]) / 0.22) ** 2))
        _blend_rows(img, r, rays * ring * strength("streaks", r), p["colour"][r] * 0.5)

    # Keratin scale: scattered white flakes.
    if (r := rows_with("scale")).size:
        flakes = np.minimum(np.clip(grain[r] - 0.5, 0, 1) * 1.6, 1)
        _blend_rows(img, r, flakes * inside[r] * strength("scale", r), (240, 232, 220))

    return _finish(img, p, rng, xx, yy)


# --------------------------------------------------------------------------- endoscopy


def _draw_endoscopy(
    lesion_label: np.ndarray, image_lesion: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Draw every endoscopy parameter (per case, then per image) in a fixed order."""
    num_lesions, n = len(lesion_label), len(image_lesion)
    lesion = {
        "mucosa": rng.uniform(0.8, 1.1, (num_lesions, 1)) * np.array([[198, 108, 96]])
        * (1 + rng.normal(0, 0.05, (num_lesions, 3))),
        "lumen_pos": rng.uniform(-0.5, 0.5, (num_lesions, 2)),
        "lumen_size": rng.uniform(0.2, 0.4, num_lesions),
        "fold_freq": rng.uniform(1.0, 2.0, num_lesions),
        "fold_dir": rng.uniform(0, np.pi, num_lesions),
        "obj_size": rng.uniform(0.22, 0.42, num_lesions),
        "obj_pos": rng.uniform(-0.3, 0.3, (num_lesions, 2)),
        "count": rng.integers(6, 11, num_lesions),
        "phase": rng.uniform(0, 2 * np.pi, (num_lesions, 2)),
        "spec_pos": rng.uniform(-0.7, 0.7, (num_lesions, 3, 2)),
    }
    params = {k: v[image_lesion] for k, v in lesion.items()}
    params["label"] = lesion_label[image_lesion]
    params.update(_pose(lesion_label, image_lesion, rng, spread=0.1))
    params.update(_draw_nuisance(n, rng))
    params["hair_on"] = np.zeros_like(params["hair_on"])
    params["vignette"] = np.full(n, 0.9)
    return params


def _render_endoscopy(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one chunk of endoscopy images: mucosa, lumen, folds and the class's finding."""
    batch = len(p["label"])
    xx, yy = _grid(size)
    mottle = _smooth_noise(rng, batch, size, 6)
    grain = _smooth_noise(rng, batch, size, max(4, size // 4))
    tone = {"esophagitis": (1.1, 1.45, 1.45), "normal-z-line": (1.0, 1.0, 1.0),
            "normal-cecum": (1.05, 1.2, 1.0), "ulcerative-colitis": (0.95, 0.65, 0.65)}
    mucosa = p["mucosa"].copy()
    for name, gain in tone.items():
        mucosa[p["label"] == KVASIR_CLASSES.index(name)] *= gain

    u, v = _local(p, xx, yy, 1.0)
    cos, sin = np.cos(_col(p["fold_dir"])), np.sin(_col(p["fold_dir"]))
    folds = 1 + 0.1 * np.cos(2 * np.pi * _col(p["fold_freq"]) * (u * cos + v * sin) + v * u)
    img = (mucosa.astype(np.float32)[:, :, None, None] / 255.0) * (folds + 0.05 * mottle)[:, None]

    def rows_of(name: str) -> np.ndarray:
        return np.flatnonzero(p["label"] == KVASIR_CLASSES.index(name))

    def finding(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distance to the finding's centre, its soft disc and its dome shading."""
        d = np.sqrt((u[r] - _col(p["obj_pos"][r, 0])) ** 2 + (v[r] - _col(p["obj_pos"][r, 1])) ** 2)
        radius = _col(p["obj_size"][r])
        return d, expit((radius - d) / 0.03), np.clip(1 - (d / radius) ** 2, 0, 1)

    # Two-tone z-line: pale squamous above a wavy boundary, red columnar below.
    if (r := rows_of("normal-z-line")).size:
        edge = v[r] - 0.15 * np.sin(3 * u[r] + _col(p["phase"][r, 0])) - 0.07 * np.sin(9 * u[r])
        _blend_rows(img, r, expit(edge / 0.04) * 0.8, (222, 176, 160))
    # Esophagitis: red erosions radiating from the centre.
    if (r := rows_of("esophagitis")).size:
        rho, theta = np.sqrt(u[r] ** 2 + v[r] ** 2), np.arctan2(v[r], u[r])
        rays = (0.5 + 0.5 * np.cos(_col(p["count"][r]) * theta + _col(p["phase"][r, 1]))) ** 8
        _blend_rows(img, r, np.minimum(rays * np.clip(rho - 0.15, 0, 1) * 1.6, 1), (190, 35, 40))
    # Dye: a blue lifted polyp (raised dome) ...
    if (r := rows_of("dyed-lifted-polyps")).size:
        _, disc, dome = finding(r)
        _blend_rows(img, r, disc * (0.6 + 0.35 * dome), (62, 102, 182))
    # ... or a blue wash around a pale resection margin.
    if (r := rows_of("dyed-resection-margins")).size:
        d, _, _ = finding(r)
        wash = np.exp(-(u[r] ** 2 + v[r] ** 2) / 0.75**2) * 0.7
        ring = np.exp(-(((d - _col(p["obj_size"][r])) / 0.08) ** 2)) * 0.85
        _blend_rows(img, r, wash, (70, 110, 190))
        _blend_rows(img, r, ring, (230, 214, 214))
    # Polyp: a raised reddish dome with shading.
    if (r := rows_of("polyps")).size:
        _, disc, dome = finding(r)
        _blend_rows(img, r, disc * (0.5 + 0.4 * dome), (178, 66, 58))
    # Pylorus: a dark round opening with radial folds.
    if (r := rows_of("normal-pylorus")).size:
        d, _, _ = finding(r)
        theta = np.arctan2(v[r], u[r])
        spokes = (0.5 + 0.5 * np.cos(6 * theta)) * np.exp(-((d / 0.5) ** 2)) * 0.35
        _blend_rows(img, r, spokes, (150, 70, 65))
        _blend_rows(img, r, expit((0.5 * _col(p["obj_size"][r]) - d) / 0.025) * 0.9, (25, 12, 12))
    # Cecum: semicircular folds and a fine vessel pattern.
    if (r := rows_of("normal-cecum")).size:
        arcs = np.cos(3 * np.pi * np.sqrt((u[r] + 0.6) ** 2 + (v[r] + 0.6) ** 2)) ** 10
        vessels = (np.abs(grain[r]) < 0.12).astype(np.float32)
        _blend_rows(img, r, 0.5 * arcs + 0.4 * vessels, (160, 55, 50))
    # Ulcerative colitis: white-yellow fibrin patches over granular red mucosa.
    if (r := rows_of("ulcerative-colitis")).size:
        _blend_rows(img, r, np.clip((grain[r] - 0.6) * 2.5, 0, 1), (236, 222, 170))

    # Lumen (dark; the pylorus is its own opening) and specular highlights.
    lumen_d2 = (u - _col(p["lumen_pos"][:, 0])) ** 2 + (v - _col(p["lumen_pos"][:, 1])) ** 2
    no_lumen = _col(p["label"] == KVASIR_CLASSES.index("normal-pylorus"))
    img *= (1 - np.exp(-lumen_d2 / _col(p["lumen_size"]) ** 2) * 0.75 * (1 - no_lumen))[:, None]
    for s in range(3):
        d2 = (xx - _col(p["spec_pos"][:, s, 0])) ** 2 + (yy - _col(p["spec_pos"][:, s, 1])) ** 2
        _blend(img, np.exp(-d2 / 0.004), (250, 250, 250))
    return _finish(img, p, rng, xx, yy)
