"""Batched image preparation on the training device: uint8 -> normalized float, random crop
with zero padding and horizontal flip drawn for the whole batch at once (no per-image PIL work).

Random numbers come from a CPU ``torch.Generator`` so that a run draws the same augmentations on
CPU and GPU; they can be drawn ahead (``ImagePipeline.draw``) and applied on the device later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImagePipeline:
    """How a dataset's uint8 images become model input."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    per_batch: bool = False  # one crop offset and flip for a whole batch, as CReFF's and CLIP2FL's code draws them

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float, standardized per channel."""
        x = images.float().div_(255.0)
        mean, std = _channel_stats(self.mean, self.std, x.device)
        return x.sub_(mean).div_(std)

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor | None:
        """The random choices of augmenting ``n`` images, drawn from ``generator`` (crop offsets,
        then flips): an (n, 3) int64 CPU tensor of row offset, column offset and flip, or None when
        this pipeline does not augment (with ``per_batch``, one row repeated ``n`` times). Drawing ahead
        and applying later (``augment``) lets a client's whole local training be drawn at once and moved
        to the device in one copy."""
        if not (self.crop_padding or self.flip):
            return None
        m = 1 if self.per_batch else n
        draws = torch.zeros(m, 3, dtype=torch.long)
        if self.crop_padding:
            draws[:, :2] = torch.randint(0, 2 * self.crop_padding + 1, (2, m), generator=generator).T
        if self.flip:
            draws[:, 2] = torch.rand(m, generator=generator) < 0.5
        return draws.repeat(n, 1) if self.per_batch else draws

    def augment(self, x: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """Apply ``draws`` (from ``draw``, on ``x``'s device) to the normalized batch ``x``: a
        random crop of the original size out of the zero-padded image, then a horizontal flip."""
        if draws is None:
            return x
        if self.crop_padding:
            x = _crop(x, self.crop_padding, draws[:, 0], draws[:, 1])
        if self.flip:
            x = torch.where(draws[:, 2].bool().view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def train_batch(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalized and augmented training batch (augmentation off when ``generator`` is None)."""
        x = self.normalize(images)
        if generator is None:
            return x
        draws = self.draw(generator, len(images))
        return self.augment(x, None if draws is None else draws.to(x.device))


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    # cached: building them per batch costs two host-to-device copies (each a sync on CUDA); made
    # outside inference mode so that a first call from evaluation leaves usable tensors
    with torch.inference_mode(False):
        return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def _crop(x: torch.Tensor, padding: int, row_offsets: torch.Tensor, col_offsets: torch.Tensor) -> torch.Tensor:
    """Per image, the window of the original size at the given offsets into the zero-padded image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (row_offsets[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (col_offsets[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def dsa_augment(x: torch.Tensor, groups: torch.Tensor, generator: torch.Generator,
                families: tuple[str, ...] = DSA_FAMILIES) -> torch.Tensor:
    """Differentiable Siamese augmentation as CReFF/CLIP2FL use it (mode 'S'): each group of
    images (one class's batch) gets one randomly chosen family, with the same parameters for every
    image of the group. Families: colour (brightness 1.0, saturation 2.0, contrast 0.5), crop
    (shift up to 1/8), cutout (1/2 x 1/2), flip, scale (up to 1.2x) and rotate (up to 15 degrees)."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    choice = torch.randint(0, len(families), (n_groups,), generator=generator)
    u = torch.rand(n_groups, 4, generator=generator)  # the group's random parameters
    out = x.clone()
    for f, family in enumerate(families):
        members = (choice[groups.cpu()] == f).nonzero().flatten().to(x.device)
        if len(members):
            out[members] = _DSA[family](x[members], u[groups[members].cpu()].to(x.device))
    return out


def _dsa_color(x, u):
    x = x + (u[:, 0].view(-1, 1, 1, 1) - 0.5) * 1.0
    x = (x - x.mean(1, keepdim=True)) * (u[:, 1].view(-1, 1, 1, 1) * 2.0) + x.mean(1, keepdim=True)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u[:, 2].view(-1, 1, 1, 1) + 0.5) + mean


def _dsa_crop(x, u):
    n, _, h, w = x.shape
    sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = (u[:, 0] * (2 * sx + 1)).floor().long().clamp(max=2 * sx) - sx
    ty = (u[:, 1] * (2 * sy + 1)).floor().long().clamp(max=2 * sy) - sy
    rows = (torch.arange(h, device=x.device).view(1, h) + tx.view(-1, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + ty.view(-1, 1) + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def _dsa_cutout(x, u):
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = (u[:, 0] * (h + 1 - ch % 2)).floor().long()
    oy = (u[:, 1] * (w + 1 - cw % 2)).floor().long()
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    inside_r = (r >= (ox - ch // 2).clamp(min=0).view(-1, 1)) & (r <= (ox - ch // 2 + ch - 1).clamp(max=h - 1).view(-1, 1))
    inside_c = (c >= (oy - cw // 2).clamp(min=0).view(-1, 1)) & (c <= (oy - cw // 2 + cw - 1).clamp(max=w - 1).view(-1, 1))
    mask = ~(inside_r.view(n, h, 1) & inside_c.view(n, 1, w))
    return x * mask.unsqueeze(1).to(x.dtype)


def _dsa_flip(x, u):
    return torch.where((u[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)


def _dsa_affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def _dsa_scale(x, u):
    ratio = 1.2
    sx, sy = u[:, 0] * (ratio - 1 / ratio) + 1 / ratio, u[:, 1] * (ratio - 1 / ratio) + 1 / ratio
    zero = torch.zeros_like(sx)
    return _dsa_affine(x, torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1))


def _dsa_rotate(x, u):
    angle = (u[:, 0] - 0.5) * 2 * 15.0 / 180 * torch.pi
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return _dsa_affine(x, torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1))


_DSA = {"color": _dsa_color, "crop": _dsa_crop, "cutout": _dsa_cutout, "flip": _dsa_flip,
        "scale": _dsa_scale, "rotate": _dsa_rotate}
