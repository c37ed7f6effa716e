"""FID and KID between two sets of images, from the Inception features of fastgan.metrics.inception.

FID (Heusel et al. 2017) follows pytorch-fid's calculate_frechet_distance (Apache-2.0), without scipy: the
trace of sqrtm(S1 S2) comes from one symmetric eigendecomposition. KID (Binkowski et al. 2018) is the unbiased
MMD with the cubic polynomial kernel, averaged over random subsets, as StyleGAN2-ADA computes it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..errors import FastganError


def inception_features(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device,
                       progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Features (N, D) float64 of uint8 image batches (n, C, H, W), C = 1 or 3, in the order given.

    model: FIDInceptionV3 or anything with its contract (float (n, 3, H, W) in [0, 1] -> (n, D)).
    progress(k) is called after each batch of k images."""
    model.eval()  # BatchNorm in training mode would mix the images of a batch
    features = []
    with torch.inference_mode():
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
                raise ValueError(f"inception_features takes uint8 (n, 1 or 3, H, W) batches, not "
                                 f"{batch.dtype} {tuple(batch.shape)}")
            images = batch.to(device).float() / 255  # as torchvision's ToTensor, which pytorch-fid uses
            images = images.expand(-1, 3, -1, -1)  # grayscale as RGB, as PIL's convert("RGB") repeats it
            features.append(model(images).double().cpu())  # a sync point, once per batch
            if progress is not None:
                progress(len(batch))
    if not features:
        return np.empty((0, 0))
    return torch.cat(features).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), as pytorch-fid's (np.cov, unbiased)."""
    if len(features) < 2:
        raise FastganError(f"FID needs the features of at least 2 images, got {len(features)}")
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), in float64.

    S1 S2 is similar to M = sqrt(S1) S2 sqrt(S1) (conjugate by sqrt(S1)), which is symmetric positive
    semi-definite, so tr(sqrtm(S1 S2)) is the sum of the square roots of M's eigenvalues: eigh, no scipy, and no
    imaginary parts to discard as scipy's general sqrtm leaves them."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FastganError(f"FID of statistics of different sizes: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    root1 = sqrtm_psd(sigma1)
    tr_covmean = np.sqrt(psd_eigenvalues(root1 @ sigma2 @ root1)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def psd_eigenvalues(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric positive semi-definite matrix, rounding's tiny negatives set to 0.

    A covariance of fewer images than dimensions (2048 features from 1,000 images) is singular, and its zero
    eigenvalues come out of eigh as +-1e-13 or so: their square roots must be 0, not NaN."""
    symmetric = (matrix + matrix.T) / 2  # products such as sqrt(S1) S2 sqrt(S1) are symmetric up to rounding
    return np.clip(np.linalg.eigvalsh(symmetric), 0, None)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def kernel_inception_distance(real_features: np.ndarray, fake_features: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over num_subsets random subsets of
    m = min(#real, #fake, max_subset_size) images of each set, drawn without replacement (StyleGAN2-ADA's
    metrics/kernel_inception_distance.py). Unbiased: about 0, possibly slightly negative, for equal
    distributions."""
    real_features = np.asarray(real_features, np.float64)
    fake_features = np.asarray(fake_features, np.float64)
    dims = real_features.shape[1]
    m = min(len(real_features), len(fake_features), max_subset_size)
    if m < 2:
        raise FastganError(f"KID needs the features of at least 2 real and 2 generated images, got "
                           f"{len(real_features)} and {len(fake_features)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = fake_features[rng.choice(len(fake_features), m, replace=False)]
        y = real_features[rng.choice(len(real_features), m, replace=False)]
        within = (x @ x.T / dims + 1) ** 3 + (y @ y.T / dims + 1) ** 3
        between = (x @ y.T / dims + 1) ** 3
        # the diagonal, k(x_i, x_i), leaves the within-set sums: that is what makes the estimate unbiased
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - between.sum() * 2 / m
    return float(total / num_subsets / m)
