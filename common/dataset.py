"""The one dataset type every loader returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class LesionDataset:
    """Images with labels, lesion ids, sites and metadata, whatever the source format.

    Parameters
    ----------
    images : tuple[str, ...] | np.ndarray
        Either image file paths, or decoded uint8 images of shape ``(N, H, W, 3)``.
    labels : np.ndarray
        Integer label per image, an index into ``class_names``.
    class_names : tuple[str, ...]
        Class names in label-index order.
    lesion_ids : np.ndarray
        Lesion id per image (str). Images of one lesion must never be split apart.
    sites : np.ndarray
        Source site per image (str); ``"unknown"`` where the format carries none.
    image_ids : np.ndarray
        Image id per image (str).
    metadata : tuple[dict[str, str], ...] (default: ())
        Extra per-image columns (age, sex, localization, ...), possibly empty.
    format : str (default: "unknown")
        The detected source format, e.g. ``"ham10000"``.
    root : str | None (default: None)
        The folder or file it was loaded from.
    """

    images: tuple[str, ...] | np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    lesion_ids: np.ndarray
    sites: np.ndarray
    image_ids: np.ndarray
    metadata: tuple[dict[str, str], ...] = field(default=())
    format: str = "unknown"
    root: str | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("images", "lesion_ids", "sites", "image_ids"):
            if len(getattr(self, name)) != n:
                raise DataError(
                    f"dataset field {name!r} has {len(getattr(self, name))} entries "
                    f"but there are {n} labels",
                    "every per-image field must have one entry per image",
                )
        if self.metadata and len(self.metadata) != n:
            raise DataError(f"metadata has {len(self.metadata)} rows for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(
                f"labels span {self.labels.min()}..{self.labels.max()} but there are "
                f"{len(self.class_names)} classes {self.class_names}"
            )
        if isinstance(self.images, np.ndarray) and (
            self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8
        ):
            raise DataError(
                f"in-memory images must be uint8 (N, H, W, 3), got {self.images.dtype} "
                f"{self.images.shape}",
                "convert to RGB uint8 0-255 before building the dataset",
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        """Whether images are decoded arrays rather than file paths."""
        return isinstance(self.images, np.ndarray)

    @property
    def num_classes(self) -> int:
        """Number of classes in the vocabulary (some may have no images)."""
        return len(self.class_names)

    @property
    def num_lesions(self) -> int:
        """Number of distinct lesions."""
        return len(set(self.lesion_ids.tolist()))

    def class_counts(self) -> dict[str, int]:
        """Images per class name, every class of the vocabulary included."""
        counts = Counter(self.labels.tolist())
        return {name: int(counts.get(i, 0)) for i, name in enumerate(self.class_names)}

    def site_counts(self) -> dict[str, int]:
        """Images per site, sorted by site name."""
        return dict(sorted(Counter(self.sites.tolist()).items()))

    def subset(self, indices: Sequence[int] | np.ndarray) -> LesionDataset:
        """Return the images at ``indices`` (same vocabulary, same format)."""
        idx = np.asarray(indices, dtype=np.int64)
        images = (
            self.images[idx] if self.in_memory else tuple(self.images[i] for i in idx.tolist())
        )
        return LesionDataset(
            images=images,
            labels=self.labels[idx],
            class_names=self.class_names,
            lesion_ids=self.lesion_ids[idx],
            sites=self.sites[idx],
            image_ids=self.image_ids[idx],
            metadata=tuple(self.metadata[i] for i in idx.tolist()) if self.metadata else (),
            format=self.format,
            root=self.root,
        )

    def read_image(self, index: int) -> np.ndarray:
        """Return image ``index`` as RGB uint8 ``(H, W, 3)``.

        Raises
        ------
        DataError
            If the file is missing or cannot be decoded.
        """
        if self.in_memory:
            return self.images[index]
        return read_rgb(self.images[index])


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode one image file into RGB uint8 ``(H, W, 3)``.

    Raises
    ------
    DataError
        If the file is missing or not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file {str(p)!r} does not exist", "check the data path and listing")
    try:
        with Image.open(p) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(
            f"image file {str(p)!r} is corrupt or not an image ({err})",
            "re-export or remove the file; the quality filter skips such files",
        ) from err
