"""Face alignment from five landmarks to InsightFace's 112x112 crop, with numpy and PIL.

The five landmarks (left eye, right eye, nose tip, left and right mouth corners, in image
pixel coordinates) are mapped onto :data:`ARCFACE_112` (InsightFace's template for 112x112
crops; the training sets MS1M, Glint360K, WebFace are cropped this way) by the least-squares
similarity transform (rotation, uniform scale, translation; no reflection) of Umeyama,
"Least-squares estimation of transformation parameters between two point patterns", IEEE
TPAMI 1991. The image is then resampled bilinearly, pixels outside it black, with the
pixel-centre convention of OpenCV's ``warpAffine`` (output pixel ``(x, y)`` at integer
coordinates samples the input at ``M^-1 (x, y)``), which InsightFace's IJB evaluation uses:
so this project needs neither OpenCV nor scikit-image for it.

>>> crop = align_face(image_rgb_uint8, landmarks_5x2)      # uint8 (112, 112, 3)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ARCFACE_112", "similarity_transform", "warp_affine", "align_face"]

#: Where the five landmarks of a 112x112 crop are (x, y), InsightFace's ``arcface_dst``.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix ``M`` of the similarity ``x -> M[:, :2] x + M[:, 2]`` that maps the
    points ``src`` (K, 2) closest to ``dst`` (K, 2) in least squares (K >= 2)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (K, 2) point sets with K >= 2, got {src.shape} and "
                         f"{dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks hold NaN or inf")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(s)
    if var_s <= 1e-12:
        raise ValueError("the landmarks coincide: no transform can be estimated")
    cov = d.T @ s / len(s)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:  # the best rotation would be a reflection: take the nearest
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_affine(image: np.ndarray | Image.Image, m: np.ndarray,
                size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """``image`` (H, W, 3) uint8 or a PIL image, mapped by ``m`` (2x3, input -> output pixel
    coordinates) onto a ``size`` (width, height) canvas: bilinear, black outside, OpenCV's
    pixel-centre convention. Returns uint8 (height, width, 3)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    a, b, c = inv[0]
    d, e, f = inv[1]
    # PIL samples the input at inv (x + 0.5, y + 0.5) in coordinates whose pixel centres
    # are at i + 0.5; shifting by half a pixel on both sides gives OpenCV's integer centres
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    out = img.transform(tuple(size), Image.Transform.AFFINE, coeffs,
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.array(out)  # writable (PIL's buffer is read-only)


def align_face(image: np.ndarray | Image.Image, landmarks: np.ndarray,
               size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` crop (uint8 RGB) of the face whose five ``landmarks`` (5, 2)
    are given in ``image``'s pixel coordinates."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lm.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks (x, y), got {lm.shape[0]}")
    m = similarity_transform(lm, ARCFACE_112 * (size / 112.0))
    return warp_affine(image, m, (size, size))
