"""The paper's image transforms, with augmentation seeded per sample.

Training draws its flip and crop from ``np.random.default_rng(seed)`` with a
seed given for each sample, never from global or per-worker generators, so a
resumed run (any number of loader workers, any start step) sees the very same
pixels. Draw order: flip (``random() < 0.5``, drawn even when flipping is
off), crop top, crop left (each ``integers(0, 2 * pad + 1)``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(img: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB ``img`` resized bilinearly to ``height`` x ``width``, as a ``[H, W, 3]`` uint8 array."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    return np.array(img)


def to_normalized_tensor(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 to a ``[3, H, W]`` float tensor, ``(x / 255 - mean) / std`` per channel."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    return tensor.mul_(scale).add_(shift).contiguous()


def pad_crop(pixels: np.ndarray, pad: int, top: int, left: int) -> np.ndarray:
    """Zero-pad ``pad`` pixels on every side, then crop the original size at (top, left).

    Equivalent to ``np.pad`` followed by slicing, without building the padded array:
    output pixel (y, x) is input pixel (y + top - pad, x + left - pad), or 0 outside.
    """
    height, width = pixels.shape[:2]
    dy, dx = top - pad, left - pad
    out = np.zeros_like(pixels)
    y0, y1 = max(0, -dy), min(height, height - dy)
    x0, x1 = max(0, -dx), min(width, width - dx)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = pixels[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
    return out


class TrainTransform:
    """Resize, random horizontal flip, zero-pad and random crop, normalise (supplementary Sec. 3)."""

    def __init__(
        self,
        height: int,
        width: int,
        flip: bool = True,
        pad: int = 7,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.height, self.width = height, width
        self.flip, self.pad = flip, pad
        self.mean, self.std = tuple(mean), tuple(std)

    def draw(self, seed: int) -> tuple[bool, int, int]:
        """The (flip, top, left) augmentation of the sample seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        flip = bool(rng.random() < 0.5) and self.flip
        top = int(rng.integers(0, 2 * self.pad + 1))
        left = int(rng.integers(0, 2 * self.pad + 1))
        return flip, top, left

    def __call__(self, img: Image.Image, seed: int | None) -> torch.Tensor:
        if seed is None:
            raise ValueError("TrainTransform needs a per-sample seed; index the dataset with (index, seed)")
        flip, top, left = self.draw(seed)
        pixels = resize(img, self.height, self.width)
        if flip:
            pixels = pixels[:, ::-1]
        if self.pad:
            pixels = pad_crop(pixels, self.pad, top, left)
        return to_normalized_tensor(pixels, self.mean, self.std)


class TestTransform:
    """Resize and normalise; no augmentation (``seed`` is accepted and ignored)."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        height: int,
        width: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.height, self.width = height, width
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        return to_normalized_tensor(resize(img, self.height, self.width), self.mean, self.std)
