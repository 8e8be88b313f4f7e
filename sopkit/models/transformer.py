"""A small patch Transformer-encoder classifier for signals and images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.errors import UserError
from sopkit.models.checks import fraction, positive_int, shape_error

__all__ = ["PatchTransformer", "transformer"]


class PatchTransformer(nn.Module):
    """A small Transformer-encoder classifier over non-overlapping patches of the input.

    ``(L,)`` and ``(C, L)`` inputs are cut into patches of ``patch`` positions, ``(C, H, W)``
    images into ``patch x patch`` squares; inputs that do not divide evenly are zero-padded at
    the end. Patches go through a Linear embedding plus a learned positional embedding, a
    pre-norm ``nn.TransformerEncoder``, then a CLS token (or the mean of the tokens), LayerNorm
    and a Linear head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        patch: int = 4,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        dim_feedforward: int = 128,
        dropout: float = 0.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.patch = patch
        self.pool = pool
        if len(self.input_shape) == 1:
            self._spatial: tuple[int, ...] = self.input_shape
            channels = 1
        else:
            channels, *rest = self.input_shape
            self._spatial = tuple(rest)
        # Round every spatial size up to a multiple of the patch; the difference is zero-padded.
        self._padded = tuple(math.ceil(s / patch) * patch for s in self._spatial)
        num_tokens = math.prod(s // patch for s in self._padded)
        patch_dim = channels * patch ** len(self._spatial)

        self.embed = nn.Linear(patch_dim, d_model)
        extra = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + extra, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            # Pre-norm trains stably without warm-up, which matters for short runs.
            norm_first=True,
        )
        # Nested tensors only help with padding masks, which we never use; off avoids a warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Cut a batch ``(N, *input_shape)`` into patch vectors ``(N, tokens, patch_dim)``."""
        n = x.shape[0]
        x = x.reshape(n, -1, *self._spatial)  # give (L,) inputs their single channel
        pad: list[int] = []
        for size, padded in zip(reversed(self._spatial), reversed(self._padded), strict=True):
            pad += [0, padded - size]  # F.pad lists the last dimension first
        if any(pad):
            x = F.pad(x, pad)
        p = self.patch
        if len(self._spatial) == 1:
            (length,) = self._padded
            x = x.reshape(n, -1, length // p, p).permute(0, 2, 1, 3)
        else:
            height, width = self._padded
            x = x.reshape(n, -1, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, math.prod(s // p for s in self._padded), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for a batch ``(N, *input_shape)``."""
        h = self.embed(self.tokens(x))
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.encoder(h + self.pos_embed)
        h = h[:, 0] if self.cls_token is not None else h.mean(dim=1)
        return self.head(self.norm(h))


def transformer(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    patch: int = 4,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    dim_feedforward: int = 128,
    dropout: float = 0.0,
    pool: str = "cls",
) -> nn.Module:
    """Validate the options, then build a :class:`PatchTransformer`."""
    name = "transformer"
    if len(input_shape) not in (1, 2, 3):
        raise shape_error(name, input_shape, "signals (L,) or (C, L) and images (C, H, W)")
    patch = positive_int(name, "patch", patch)
    d_model = positive_int(name, "d_model", d_model)
    layers = positive_int(name, "layers", layers)
    heads = positive_int(name, "heads", heads)
    dim_feedforward = positive_int(name, "dim_feedforward", dim_feedforward)
    dropout = fraction(name, "dropout", dropout)
    if d_model % heads:
        raise UserError(
            f"Model {name!r}: d_model ({d_model}) must be divisible by heads ({heads})."
        )
    if pool not in ("cls", "mean"):
        raise UserError(f"Option 'pool' of model {name!r} must be 'cls' or 'mean', got {pool!r}.")
    return PatchTransformer(
        input_shape,
        num_classes,
        patch=patch,
        d_model=d_model,
        layers=layers,
        heads=heads,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        pool=pool,
    )
