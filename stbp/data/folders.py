"""Image folders on disk: a user's own (``imagefolder``: ``DIR/train/<class>/<files>`` and ``DIR/val/<class>/<files>``,
the layout torchvision's ``ImageFolder`` reads) and ILSVRC2012 (``imagenet``: the same layout under
``data_dir/imagenet``, or the official archives there, prepared into it once with torchvision's ``ImageNet``).

Listing a folder gives a :class:`FolderIndex`: the sorted class names and, per split, the relative paths and
labels of its image files, held in numpy arrays (fixed-width bytes, not a list of Python strings: the decoding
processes that fork from the trainer share them without copying, and a million paths take tens of MB). Files are
images by their extension (torchvision's list); anything else (``.DS_Store``, ``Thumbs.db``, text) is ignored.
A layout that cannot be read is refused here, before any training: no ``train``/``val`` folders, a class folder
with no images, a class in ``val`` that ``train`` lacks. Its :attr:`~FolderIndex.identity` names the exact files
and labels, so that runs on different folders never compare blindly. A sweep lists the folder once and saves the
index (:meth:`FolderIndex.save`) for its trials to read.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from dataclasses import dataclass

import numpy as np

from .catalog import DATASETS, DatasetSpec
from .files import DataFormatError, DataNotFoundError, resolve_data_dir

__all__ = ["IMAGE_EXTENSIONS", "FolderIndex", "list_folder", "folder_root", "folder_index"]

#: What counts as an image (torchvision's ``IMG_EXTENSIONS``), in any letter case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
SPLITS = ("train", "val")
INDEX_ARRAYS = ("train_paths", "train_labels", "test_paths", "test_labels")


@dataclass(frozen=True, eq=False)
class FolderIndex:
    """The image files of a folder set: ``classes`` (sorted names), and for ``train`` and ``test`` (the ``val``
    folder) the paths relative to ``root`` (``S`` bytes arrays, sorted by class then path) and int64 labels."""

    root: str
    classes: tuple[str, ...]
    train_paths: np.ndarray
    train_labels: np.ndarray
    test_paths: np.ndarray
    test_labels: np.ndarray

    @property
    def identity(self) -> str:
        """A hash of the sorted relative paths and labels of the training and test files (16 hex digits), logged as
        the run's ``split_hash``: equal for two runs only when they read the same files with the same labels."""
        h = hashlib.sha256()
        splits = (("train", self.train_paths, self.train_labels), ("test", self.test_paths, self.test_labels))
        for name, paths, labels in splits:
            h.update(f"{name}\n".encode())
            for lo in range(0, len(paths), 1 << 16):  # in chunks: a million lines at once would cost 300 MB
                chunk = zip(paths[lo : lo + (1 << 16)].tolist(), labels[lo : lo + (1 << 16)].tolist())
                h.update(b"".join(b"%s\t%d\n" % (p, y) for p, y in chunk))
        return h.hexdigest()[:16]

    def subset(self, classes: int) -> FolderIndex:
        """The first ``classes`` classes only (all when 0 or more than there are)."""
        if not 0 < classes < len(self.classes):
            return self
        keep_train, keep_test = self.train_labels < classes, self.test_labels < classes
        return FolderIndex(
            self.root,
            self.classes[:classes],
            self.train_paths[keep_train],
            self.train_labels[keep_train],
            self.test_paths[keep_test],
            self.test_labels[keep_test],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` (``.npz``; no pickled objects, :meth:`load` reads it safely)."""
        arrays = {k: getattr(self, k) for k in INDEX_ARRAYS}
        classes = np.array([c.encode() for c in self.classes], dtype=bytes)
        tmp = pathlib.Path(f"{path}.tmp.npz")
        np.savez(tmp, root=np.array(self.root.encode()), classes=classes, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FolderIndex:
        """An index :meth:`save` wrote; :class:`DataFormatError` naming the file if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as f:
                fields = {k: f[k] for k in ("root", "classes", *INDEX_ARRAYS)}
        except (OSError, KeyError, ValueError) as exc:
            raise DataFormatError(f"{path} is not a file index of an image folder: {exc}") from None
        root, classes = fields.pop("root").item().decode(), tuple(c.decode() for c in fields.pop("classes").tolist())
        return cls(root, classes, **fields)


def _images_under(folder: pathlib.Path) -> list[str]:
    """The image files under ``folder`` (recursively, following links, as ImageFolder does), relative to it."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = pathlib.Path(here).relative_to(folder)
        found += [str(rel / f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def _split(root: pathlib.Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            continue  # a class with no test images
        files = _images_under(folder)
        if not files:
            raise DataFormatError(f"{folder} holds no images (files ending in {', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.fsencode(f"{split}/{name}/{f}") for f in files]
        labels += [label] * len(files)
    return np.array(paths, dtype=bytes), np.array(labels, dtype=np.int64)


def list_folder(root: str | os.PathLike) -> FolderIndex:
    """List ``root/train/<class>/`` and ``root/val/<class>/`` (:class:`DataNotFoundError` without them,
    :class:`DataFormatError` for a class folder with no images or a ``val`` class that ``train`` lacks)."""
    root = pathlib.Path(root)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"{root} is not an image folder: it has no {' or '.join(missing)} folder "
            f"(expected {root}/train/<class>/<images> and {root}/val/<class>/<images>)"
        )
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFormatError(f"{root / 'train'} has no class folders (expected {root}/train/<class>/<images>)")
    extra = sorted(
        d.name for d in (root / "val").iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in classes
    )
    if extra:
        raise DataFormatError(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(extra[:5])}")
    train_paths, train_labels = _split(root, "train", classes)
    test_paths, test_labels = _split(root, "val", classes)
    if not len(test_paths):
        raise DataFormatError(f"{root / 'val'} has no class folders with images")
    return FolderIndex(str(root), tuple(classes), train_paths, train_labels, test_paths, test_labels)


def _prepare_imagenet(root: pathlib.Path) -> None:
    """Extract the official archives in ``root`` into ``root/train/<wnid>/`` and ``root/val/<wnid>/`` with
    torchvision (which checks their checksums and sorts the validation images into class folders by the devkit)."""
    from torchvision.datasets import imagenet

    print(f"[stbp] preparing ImageNet from its archives in {root} (once; this takes a while)", flush=True)
    try:
        for split in SPLITS:
            imagenet.ImageNet(str(root), split=split)
    except RuntimeError as exc:
        raise DataFormatError(f"the ImageNet archives in {root} cannot be prepared: {exc}") from None


def folder_root(spec: DatasetSpec, data_dir: str | os.PathLike | None, prepare: bool = True) -> pathlib.Path:
    """Where ``spec``'s folders are: ``data_dir`` itself for an image folder; ``data_dir/imagenet`` (or ``data_dir``
    when it is that folder) for ImageNet, prepared from the archives there when only those are (``prepare``)."""
    base = resolve_data_dir(data_dir)
    if spec.name != "imagenet":
        if not base.is_dir():
            raise DataNotFoundError(f"the image folder {base} (data.data_dir) does not exist")
        return base
    for root in (base / spec.folder, base):
        if all((root / s).is_dir() for s in SPLITS):
            return root
        if all((root / a).is_file() for a in IMAGENET_ARCHIVES):
            if prepare:
                _prepare_imagenet(root)
            return root
    raise DataNotFoundError(
        f"ImageNet is not in {base / spec.folder}: put its prepared folders there (train/<wnid>/*.JPEG, "
        f"val/<wnid>/*.JPEG) or the official archives {', '.join(IMAGENET_ARCHIVES)} (image-net.org: it needs a "
        "login, so it is never downloaded)"
    )


def folder_index(
    name: str, data_dir: str | os.PathLike | None, classes: int = 0, file_index: str | None = None, prepare=True
) -> FolderIndex:
    """The listing of data set ``name`` (a :data:`~stbp.data.catalog.DATASETS` entry that is ``streamed``), its first
    ``classes`` classes when given: read from ``file_index`` when given (it must list the same folder), else listed."""
    spec = DATASETS[name]
    root = folder_root(spec, data_dir, prepare=prepare)
    if file_index is not None:
        index = FolderIndex.load(file_index)
        if pathlib.Path(index.root) != root:
            raise DataFormatError(f"the file index {file_index} lists {index.root}, not {root} (data.file_index)")
    else:
        index = list_folder(root)
    if spec.classes and len(index.classes) > spec.classes:
        raise DataFormatError(f"{root} has {len(index.classes)} classes; {name} has {spec.classes}")
    return index.subset(classes)
