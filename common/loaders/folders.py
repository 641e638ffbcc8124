"""Load a class-per-folder image tree (e.g. Kvasir v2: one folder of .jpg per class)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.dataset import LesionDataset
from common.errors import DataError
from common.log import get_logger

from ._files import IMAGE_SUFFIXES

log = get_logger("data")


def class_folders(path: str | Path) -> dict[str, list[Path]]:
    """Map each visible sub-folder of ``path`` to its image files (sorted, non-recursive).

    Returns an empty dict when ``path`` is not a folder. Hidden folders (``.name``) are ignored.
    """
    root = Path(path)
    if not root.is_dir():
        return {}
    tree: dict[str, list[Path]] = {}
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        with os.scandir(sub) as entries:
            tree[sub.name] = sorted(
                Path(e.path)
                for e in entries
                if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file()
            )
    return tree


def load_folders(path: str | Path) -> LesionDataset:
    """Load a folder whose sub-folders are classes, without decoding images.

    Class names are the sorted sub-folder names, kept as the dataset's own vocabulary (not
    mapped onto HAM10000). Images are the ``.jpg``/``.jpeg``/``.png`` files directly inside
    each class folder. The image id (also the lesion id) is ``<class>/<file stem>``; every
    site is ``"unknown"``.

    Parameters
    ----------
    path : str | Path
        The root folder.

    Returns
    -------
    LesionDataset
        Format ``"folders"``; a class whose folder holds no image is kept in the vocabulary
        with 0 images and a warning.

    Raises
    ------
    DataError
        If ``path`` is not a folder, has no sub-folder, or no sub-folder holds an image.
    """
    root = Path(path)
    tree = class_folders(root)
    if not tree:
        raise DataError(
            f"{str(root)!r} is not a folder with class sub-folders",
            "point at a folder holding one sub-folder of .jpg/.jpeg/.png images per class",
        )
    empty = [name for name, files in tree.items() if not files]
    if len(empty) == len(tree):
        raise DataError(
            f"none of the class folders of {str(root)!r} ({', '.join(tree)}) holds a "
            f".jpg/.jpeg/.png image",
            "put the images directly inside one sub-folder per class",
        )
    if empty:
        log.warning("class folder(s) %s in %s hold no image", ", ".join(empty), root)
    class_names = tuple(tree)
    images = [str(f) for files in tree.values() for f in files]
    labels = [i for i, files in enumerate(tree.values()) for _ in files]
    ids = np.asarray([f"{name}/{f.stem}" for name, files in tree.items() for f in files], dtype=str)
    log.info("%s: %d images in %d class folders", root, len(images), len(class_names))
    return LesionDataset(
        images=tuple(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        lesion_ids=ids,
        sites=np.full(len(images), "unknown"),
        image_ids=ids.copy(),
        metadata=(),
        format="folders",
        root=str(root),
    )
