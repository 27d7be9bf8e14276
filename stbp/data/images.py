"""Image folders written for tests and benchmarks: real image files in the ``train/<class>/`` and ``val/<class>/``
layout (:mod:`.folders`), of several sizes, none square, with a class-dependent pattern that a small network
learns in a few steps. ``odd=True`` adds the valid files real collections hold besides RGB baseline JPEGs
(grayscale, CMYK and progressive JPEGs, palette and RGBA PNGs, an upper-case ``.JPEG``) and files that are not
images (``.DS_Store``, ``Thumbs.db``, a text file), which a reader must ignore.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

__all__ = ["SIZES", "write_image_folder", "class_image"]

#: (width, height) of the images written, in turn: none square, landscape and portrait.
SIZES = ((48, 40), (40, 56), (64, 44), (37, 61), (72, 52))


def class_image(
    label: int, classes: int, size: tuple[int, int], rng: np.random.Generator, noise: float = 12.0
) -> Image.Image:
    """An RGB image of class ``label``: a colour and a stripe direction of its own, plus noise (its std)."""
    width, height = size
    hue = np.array([np.cos(2 * np.pi * label / classes), np.sin(2 * np.pi * label / classes), (-1) ** label])
    colour = 128 + 90 * hue
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.sin((xx if label % 2 else yy) * (0.3 + 0.15 * (label % 3)))
    pixels = colour[None, None, :] + 40 * stripes[..., None] + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _save_odd(img: Image.Image, folder: pathlib.Path, i: int, n: int) -> None:
    """Image ``i`` of a class folder as its ``n``-th odd but valid file: another mode or format of the image."""
    kinds = [
        lambda: img.convert("L").save(folder / f"gray_{i}.jpg", quality=90),
        lambda: img.convert("CMYK").save(folder / f"cmyk_{i}.jpg", quality=90),
        lambda: img.save(folder / f"progressive_{i}.jpg", quality=90, progressive=True),
        lambda: img.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / f"palette_{i}.png"),
        lambda: img.convert("RGBA").save(folder / f"alpha_{i}.png"),
        lambda: img.save(folder / f"upper_{i}.JPEG", quality=90, format="JPEG"),
    ]
    kinds[n % len(kinds)]()


def write_image_folder(
    root: str | pathlib.Path,
    classes: int = 3,
    train_per_class: int = 20,
    val_per_class: int = 6,
    *,
    odd: bool = False,
    sizes=SIZES,
    seed: int = 0,
) -> pathlib.Path:
    """Write ``root/train/class_<k>/`` and ``root/val/class_<k>/`` with that many images a class (JPEGs; with
    ``odd``, every third file is one of the odd but valid kinds and each folder gets files that are not images)."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = class_image(label, classes, sizes[(i + label) % len(sizes)], rng)
                if odd and i % 3 == 2:
                    _save_odd(img, folder, i, i // 3)
                else:
                    img.save(folder / f"img_{i:04d}.jpg", quality=90)
            if odd:
                (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
                (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
                (folder / "notes.txt").write_text("not an image\n")
    return root
