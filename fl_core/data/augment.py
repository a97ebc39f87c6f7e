"""Batched image preparation on the training device: uint8 -> normalized float, random crop
with zero padding and horizontal flip drawn for the whole batch at once (no per-image PIL work).

Random numbers come from a CPU ``torch.Generator`` so that a run draws the same augmentations on
CPU and GPU.
"""

from __future__ import annotations

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

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float, standardized per channel."""
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def train_batch(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalized and augmented training batch (augmentation off when ``generator`` is None)."""
        x = self.normalize(images)
        if generator is None:
            return x
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        return x


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the original size out of the zero-padded batch."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


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
