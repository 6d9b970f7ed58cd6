"""Rendering of the synthetic face-like identities (see :mod:`hfsoftmax.data.synthetic` for the
set built from them, and its long-tailed variant).

- a family draws a coarse 4x4 colour code for the face region, skin/hair/background colours
  and a face geometry (face ellipse, hairline, eyes, mouth);
- an identity is its family's parameters plus a small identity-specific deviation (colour
  code, skin, hair, eye spacing/height, mouth width);
- each image is the identity's template under a random pose (rotation, scale, shift),
  illumination (gain per channel, a linear light gradient) and pixel noise, JPEG-encoded at a
  fixed quality (no timestamps or metadata, so bytes are reproducible).

Every random quantity has its own stream keyed by (seed, tag, id), so an image's bytes depend
only on the configuration and its identity, never on the order or the process rendering it.

>>> jpegs = render_identity_images(SyntheticConfig(seed=0), family=3, cls=31, n=2)
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

__all__ = ["SIZE", "JPEG_QUALITY", "render_identity_images", "noise_bank"]

SIZE = 112
JPEG_QUALITY = 90

# seed-stream tags: each random quantity has its own stream, keyed by (seed, tag, id)
_FAMILY, _IDENTITY, _IMAGES, _PAIR, _LAYOUT = 1, 2, 3, 4, 5


# -- rendering ----------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_C = (SIZE - 1) / 2.0
_RAMP = ((np.arange(SIZE) - _C) / SIZE).astype(np.float32)
_NOISE_BANK: np.ndarray | None = None


def noise_bank() -> np.ndarray:
    # Standard normal noise drawn once per process from a fixed seed; images take random
    # windows of it (drawing 37K normals per image would cost more than the rest together).
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20180117).standard_normal(1 << 20, dtype=np.float32)
    return _NOISE_BANK


def _family_params(seed: int, family: int) -> dict:
    r = np.random.default_rng([seed, _FAMILY, family])
    return {
        "bg": r.uniform(0.05, 0.95, 3), "skin": r.uniform(0.25, 0.95, 3),
        "hair": r.uniform(0.0, 0.7, 3), "code": r.uniform(0.0, 1.0, (4, 4, 3)),
        "face_a": r.uniform(30, 40), "face_b": r.uniform(40, 50),
        "hairline": r.uniform(22, 42), "eye_dx": r.uniform(13, 21),
        "eye_y": r.uniform(44, 54), "eye_r": r.uniform(4, 7), "eye": r.uniform(0, 0.35, 3),
        "mouth_y": r.uniform(76, 86), "mouth_w": r.uniform(9, 18),
    }


def _identity_params(seed: int, fam: dict, cls: int, dev: float) -> dict:
    r = np.random.default_rng([seed, _IDENTITY, cls])
    p = dict(fam)
    p["code"] = np.clip(fam["code"] + r.normal(0, dev, (4, 4, 3)), 0, 1)
    p["skin"] = np.clip(fam["skin"] + r.normal(0, dev / 2, 3), 0, 1)
    p["hair"] = np.clip(fam["hair"] + r.normal(0, dev / 2, 3), 0, 1)
    p["eye_dx"] = fam["eye_dx"] + r.normal(0, 1.5)
    p["eye_y"] = fam["eye_y"] + r.normal(0, 1.5)
    p["mouth_w"] = fam["mouth_w"] + r.normal(0, 2.0)
    p["hairline"] = fam["hairline"] + r.normal(0, 3.0)
    # float32 throughout the rendering (float64 would double its cost)
    return {k: (np.float32(v) if np.ndim(v) == 0 else np.asarray(v, np.float32))
            for k, v in p.items()}


_MOUTH = np.float32([0.55, 0.12, 0.15])


def _soft(d: np.ndarray, sharp: float = 6.0) -> np.ndarray:
    # 1 inside (d < 1), 0 outside, a soft edge of ~1/sharp of the radius
    return np.clip((np.float32(1) - d) * np.float32(sharp), np.float32(0), np.float32(1))


def _template(p: dict) -> np.ndarray:
    """The identity's canonical image, float32 (S, S, 3) in [0, 1]."""
    code = Image.fromarray((p["code"] * 255).astype(np.uint8)).resize((SIZE, SIZE),
                                                                      Image.BILINEAR)
    code = np.asarray(code, dtype=np.float32) / 255.0
    face_d = ((_XX - _C) / p["face_a"]) ** 2 + ((_YY - _C - 4) / p["face_b"]) ** 2
    img = np.broadcast_to(p["bg"].astype(np.float32), (SIZE, SIZE, 3)).copy()
    face = _soft(face_d)[..., None]
    img = img * (1 - face) + (0.35 * p["skin"] + 0.65 * code) * face
    hair = (_soft(face_d / 1.25) * np.clip((p["hairline"] - _YY) / 3.0, 0, 1))[..., None]
    img = img * (1 - hair) + p["hair"] * hair
    for sx in (-1, 1):
        ex = _C + sx * p["eye_dx"]
        eye = _soft(((_XX - ex) ** 2 + (_YY - p["eye_y"]) ** 2) / p["eye_r"] ** 2, 3)[..., None]
        img = img * (1 - eye) + p["eye"] * eye
    mouth = _soft(((_XX - _C) / p["mouth_w"]) ** 2 + ((_YY - p["mouth_y"]) / 3.0) ** 2, 3)
    img = img * (1 - mouth[..., None]) + _MOUTH * mouth[..., None]
    return img


def _augment(template_u8: Image.Image, bg: tuple, r: np.random.Generator,
             noise: float) -> bytes:
    """One image of an identity: pose, illumination and noise variation; JPEG bytes."""
    angle = math.radians(r.normal(0, 6))
    scale = math.exp(r.normal(0, 0.05))
    tx, ty = r.normal(0, 3, 2)
    # PIL's AFFINE maps output pixel (x, y) to input (a x + b y + c, d x + e y + f)
    ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
    cx, cy = _C + tx, _C + ty
    coeffs = (ca, sa, _C - ca * cx - sa * cy, -sa, ca, _C + sa * cx - ca * cy)
    img = template_u8.transform((SIZE, SIZE), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                fillcolor=bg)
    x = np.array(img, dtype=np.float32)  # a writable copy: the arithmetic below is in place
    gain = (r.uniform(0.7, 1.2) * (1 + r.normal(0, 0.05, 3))).astype(np.float32)
    phi = r.uniform(0, 2 * math.pi)
    amp = r.uniform(0, 0.3)
    light = 1 + amp * (_RAMP[:, None] * math.sin(phi) + _RAMP[None, :] * math.cos(phi))
    x *= light[..., None]
    x *= gain
    bank = noise_bank()
    start = int(r.integers(bank.size - x.size))
    x += bank[start:start + x.size].reshape(x.shape) * np.float32(r.uniform(1, noise))
    x += np.float32(0.5)
    np.clip(x, 0, 255, out=x)
    out = Image.fromarray(x.astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _identity_render_state(cfg, family: int, cls: int):
    p = _identity_params(cfg.seed, _family_params(cfg.seed, family), cls,
                         cfg.identity_deviation)
    t = _template(p)
    bg = tuple(int(v) for v in np.clip(p["bg"] * 255 + 0.5, 0, 255))
    return Image.fromarray(np.clip(t * 255 + 0.5, 0, 255).astype(np.uint8)), bg


def render_identity_images(cfg, family: int, cls: int, n: int,
                           stream: int = 0) -> list[bytes]:
    """JPEG bytes of ``n`` images of identity ``cls`` (of ``family``); deterministic in
    (cfg, family, cls, stream). Exposed for tests and for rendering extra samples."""
    tpl, bg = _identity_render_state(cfg, family, cls)
    r = np.random.default_rng([cfg.seed, _IMAGES, cls, stream])
    return [_augment(tpl, bg, r, cfg.noise) for _ in range(n)]
