"""Image helpers shared by the inversion attacks: denoising filters, total variation, PSNR and
SSIM, and writing image grids as PNG bytes. Images are float (N, C, H, W) in [0, 1]."""

import io
import math

import torch
from PIL import Image
from torch.nn import functional


def gaussian_kernel(sigma: float, channels: int, size: int | None = None) -> torch.Tensor:
    size = size or 2 * math.ceil(2 * sigma) + 1
    steps = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-(steps**2) / (2 * sigma**2))
    line = line / line.sum()
    return torch.outer(line, line).expand(channels, 1, size, size).contiguous()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = gaussian_kernel(sigma, images.shape[1]).to(images)
    padded = functional.pad(images, [kernel.shape[-1] // 2] * 4, mode="reflect")
    return functional.conv2d(padded, kernel, groups=images.shape[1])


def median_filter(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    n, c, h, w = images.shape
    padded = functional.pad(images, [size // 2] * 4, mode="reflect")
    windows = functional.unfold(padded, size)  # (N, C*size*size, H*W)
    return windows.view(n, c, size * size, h * w).median(dim=2).values.view(n, c, h, w)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: the mean absolute difference between neighbouring pixels."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def psnr(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, for a peak of 1.0 (capped at 100 dB for identical images)."""
    mse = ((estimate - truth) ** 2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp_max(100)


def ssim(estimate: torch.Tensor, truth: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per image, Wang et al. (2004) with a Gaussian window no larger than the image (7x7 at
    most, so that 8x8 digits still have valid windows), constants for a peak of 1.0."""
    size = min(7, truth.shape[-1], truth.shape[-2])
    size -= 1 - size % 2
    kernel = gaussian_kernel(sigma, truth.shape[1], size).to(truth)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(x, kernel, groups=truth.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = local_mean(estimate), local_mean(truth)
    var_x = local_mean(estimate * estimate) - mu_x**2
    var_y = local_mean(truth * truth) - mu_y**2
    cov = local_mean(estimate * truth) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.flatten(1).mean(dim=1)


def png_grid(rows: list[torch.Tensor], pixels_per_unit: int = 8) -> bytes:
    """The rows of images (each (N, C, H, W)) as one PNG, images side by side with a 1-pixel
    gap, enlarged by nearest neighbour. PIL, not matplotlib: a grid costs a millisecond."""
    columns = max(len(row) for row in rows)
    channels, height, width = rows[0].shape[1:]
    canvas = torch.ones(channels, len(rows) * (height + 1), columns * (width + 1))
    for r, row in enumerate(rows):
        for col, image in enumerate(row.detach().cpu().clamp(0, 1)):
            top, left = r * (height + 1), col * (width + 1)
            canvas[:, top : top + height, left : left + width] = image
    canvas = canvas.repeat_interleave(pixels_per_unit, 1).repeat_interleave(pixels_per_unit, 2)
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
