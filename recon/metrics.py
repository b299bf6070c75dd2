"""Image and geometry metrics: PSNR, SSIM (torchmetrics) and Chamfer distance (scipy cKDTree).

Shared by the NeRF fits (:mod:`systems`) and the novel-view evaluation
(:mod:`guidance.evaluation`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _same_shape(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")


def _as_nchw(images: Tensor) -> Tensor:
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) or (H, W, C) images, got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float()


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of ``pred`` vs ``target`` (same shape, values in [0, data_range]).

    The mean squared error is taken over the whole batch (not averaged per image).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _same_shape(pred, target, "psnr")
    return float(peak_signal_noise_ratio(pred.detach().float(), target.detach().float(), data_range=data_range))


def psnr_per_image(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB of each image of a batch (N, ...) vs ``target`` (same shape, values in [0, data_range]) -> (N,)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _same_shape(pred, target, "psnr")
    dims = tuple(range(1, pred.ndim))
    value = peak_signal_noise_ratio(pred.detach().float(), target.detach().float(), data_range=data_range, reduction="none", dim=dims)
    return value.reshape(-1)


def ssim_per_image(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity of each channels-first image (N, C, H, W) in [0, data_range] -> (N,).

    Gaussian window 11 px, sigma 1.5 (the usual SSIM settings); images must be at least 11 px on a side.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _same_shape(pred, target, "ssim")
    value = structural_similarity_index_measure(pred.detach().float(), target.detach().float(), data_range=data_range, reduction="none")
    return value.reshape(-1)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity of channels-last images (N, H, W, C) or (H, W, C) in [0, data_range].

    The mean of :func:`ssim_per_image` over the batch.
    """
    _same_shape(pred, target, "ssim")
    return float(ssim_per_image(_as_nchw(pred.detach()), _as_nchw(target.detach()), data_range).mean())


def chamfer_distance(points_a: Tensor | np.ndarray, points_b: Tensor | np.ndarray) -> float:
    """Symmetric Chamfer distance between point sets (A, 3) and (B, 3), in their units (not squared).

    ``0.5 * (mean_a min_b |a - b| + mean_b min_a |b - a|)``.
    """
    from scipy.spatial import cKDTree

    a = _points(points_a, "points_a")
    b = _points(points_b, "points_b")
    a_to_b = cKDTree(b).query(a)[0]
    b_to_a = cKDTree(a).query(b)[0]
    return float(0.5 * (a_to_b.mean() + b_to_a.mean()))


def _points(points: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(f"chamfer_distance: {name} must be a non-empty (P, 3) array, got {array.shape}")
    return array.astype(np.float64)
