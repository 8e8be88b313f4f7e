"""Training-time augmentation of in-memory image sets: a random crop and flip per image, on the device.

``--augment standard`` trains on each data set's standard recipe. For the sets held in memory
(:class:`~sopkit.data.splits.TensorSplit`: CIFAR-10, MNIST, Fashion-MNIST) and for imagefolder, the
recipe is a :class:`CropFlip` that the training loop applies to every training batch on the training
device, drawing from a generator of its own (seeded from the run, so the batch order does not change
when augmentation is turned on). Every image in a batch gets its own crop offset and its own flip,
in one vectorised gather: no per-image Python, no host round trip. (torchvision's batched transforms
draw once per call, which would crop and flip a whole batch alike; the per-image scheme follows
KellerJordan/cifar10-airbench's ``batch_crop`` and ``batch_flip_lr``.) ImageNet's recipe runs in the
``DataLoader`` workers instead (:mod:`sopkit.data.imagenet`). Evaluation is never augmented: only the
loop's training batches go through a recipe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["AUGMENTS", "BatchAugment", "CropFlip"]

#: The values of ``--augment``: ``none``, or the data set's standard recipe (which is no
#: augmentation at all for the vector sets, mnist1d and digits).
AUGMENTS = ("none", "standard")


class BatchAugment(Protocol):
    """A random transform of a whole training batch ``(N, C, H, W)``, drawing from ``generator``."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class CropFlip:
    """Pad each image by ``padding`` pixels of ``fill``, crop it back to its size at a random offset,
    then flip it left-right with probability 1/2 (when ``flip``); every image draws its own.

    ``fill`` is the padding value per channel (one value for all channels when it has one entry).
    The loaders set it to the normalised value of a black pixel, so the recipe equals torchvision's
    ``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()`` on the raw images. The padded
    image is never materialised: out-of-image source pixels are masked to ``fill`` instead.
    """

    padding: int
    flip: bool = True
    fill: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {self.padding!r}")
        if not self.fill:
            raise ValueError("fill needs at least one value")
        object.__setattr__(self, "fill", tuple(float(v) for v in self.fill))

    def draw(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random choices for ``n`` images: offsets ``(n, 2)`` (rows, columns) in
        ``[-padding, padding]`` and flips ``(n,)`` (bool). Drawn on ``generator``'s device, so a
        seed means the same augmentation whichever device the images are on."""
        gen_device = generator.device
        span = 2 * self.padding + 1
        shifts = torch.randint(0, span, (n, 2), generator=generator, device=gen_device)
        flips = torch.rand(n, generator=generator, device=gen_device) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return (shifts - self.padding).to(device), flips.to(device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shifts, flips = self.draw(len(images), generator, images.device)
        return crop_flip(images, shifts, flips, self.fill)


def crop_flip(
    images: torch.Tensor,
    shifts: torch.Tensor,
    flips: torch.Tensor,
    fill: tuple[float, ...] = (0.0,),
) -> torch.Tensor:
    """Each image ``i`` of ``images`` ``(N, C, H, W)`` cropped at offset ``shifts[i]`` (rows,
    columns) from its ``fill``-padded self, then mirrored left-right where ``flips[i]``.

    Output pixel ``(r, c)`` of image ``i`` is input pixel ``(r + dy, c' + dx)`` with
    ``c' = W - 1 - c`` when flipped (else ``c``), or ``fill`` where that lies outside the image.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images shaped (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).unsqueeze(0) + shifts[:, :1]  # (N, H) source rows
    cols = torch.arange(w, device=device).unsqueeze(0).expand(n, w)
    cols = torch.where(flips.unsqueeze(1), w - 1 - cols, cols) + shifts[:, 1:]  # (N, W)
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < w)
    # Two gathers (rows, then columns) with clamped indices; the mask then puts the padding in.
    out = images.gather(2, rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
    inside = (row_ok.view(n, 1, h, 1) & col_ok.view(n, 1, 1, w)).expand(n, c, h, w)
    if len(fill) not in (1, c):
        raise ValueError(f"fill has {len(fill)} values for {c} channels")
    return torch.where(inside, out, _fill_tensor(tuple(fill), images.dtype, device))


@functools.lru_cache(maxsize=16)
def _fill_tensor(fill: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device: a fresh host-to-device copy every batch would cost a synchronisation.
    return torch.tensor(fill, dtype=dtype, device=device).view(1, -1, 1, 1)
