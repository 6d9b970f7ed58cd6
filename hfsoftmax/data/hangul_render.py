"""Rendering of Hangul syllables for the Hangul glyph set (:mod:`hfsoftmax.data.hangul`).

Each image is one syllable drawn with a random Korean font from the Debian packages
``fonts-nanum``, ``fonts-baekmuk`` and ``fonts-unfonts-core``, then augmented:

- font size jitter (+-6 px around a per-font size that gives every font the same ink height),
- stroke thickness: a 3x3 dilation (p 0.2) or erosion (p 0.15),
- an affine warp: rotation (sd 5 degrees), scale (sd 7 %), horizontal shear (sd 0.1), shift
  (sd 3.5 px),
- a Gaussian blur of radius 0-1.2 px,
- colours: a background of brightness 0.45-0.95 with a slight tint, ink darker by a contrast
  of 0.35-0.85 (one image in five inverted: light ink on a dark ground),
- pixel noise (sd 1..``noise`` on 0..255), JPEG quality 90, no metadata.

Every draw comes from the image's own random stream, so the bytes depend only on the seed,
the syllable, the stream and the font files (FreeType rendering is deterministic for fixed
fonts and library versions, which the set's metadata records with the fonts' sha256).
Glyphs are laid out with Pillow's basic layout (no shaping library), so libraqm's presence
does not change them.

>>> fonts = find_fonts()                     # paths of the default fonts found
>>> jpeg = render_syllable("한", fonts, np.random.default_rng(0), noise=8.0)
"""
from __future__ import annotations

import hashlib
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .synthetic_render import noise_bank

__all__ = ["DEFAULT_FONTS", "FONT_DIRS", "APT_COMMAND", "find_fonts", "font_records",
           "render_syllable", "versions"]

SIZE = 112
JPEG_QUALITY = 90
FONT_DIRS = ("/usr/share/fonts",)
APT_COMMAND = "apt-get install -y fonts-nanum fonts-baekmuk fonts-unfonts-core"
# The packages' fonts that draw all 11,172 syllables (baekmuk's dotum/hline and the
# NanumSquare family draw only the 2,350 of KS X 1001 and are left out).
DEFAULT_FONTS = (
    "NanumBarunGothic.ttf", "NanumBarunGothicBold.ttf", "NanumGothic.ttf",
    "NanumGothicBold.ttf", "NanumGothicCoding.ttf", "NanumGothicCodingBold.ttf",
    "NanumMyeongjo.ttf", "NanumMyeongjoBold.ttf",
    "batang.ttf", "gulim.ttf",
    "UnBatang.ttf", "UnBatangBold.ttf", "UnDinaru.ttf", "UnDinaruBold.ttf",
    "UnDinaruLight.ttf", "UnDotum.ttf", "UnDotumBold.ttf", "UnGraphic.ttf",
    "UnGraphicBold.ttf", "UnGungseo.ttf", "UnPilgi.ttf", "UnPilgiBold.ttf",
)
_INK_HEIGHT = 72          # px: every font is sized so that reference syllables are this tall
_REFERENCE = "한뷁갉이"   # tall and short syllables: their union box sets a font's size
_MAX_WALK = 100_000       # files looked at under the font folders


def find_fonts(names: tuple[str, ...] | None = None,
               dirs: tuple[str, ...] = FONT_DIRS) -> list[str]:
    """Paths of the font files ``names`` (file names, or paths) under ``dirs``, in the order
    of ``names``. ``names=None``: those of :data:`DEFAULT_FONTS` that are installed (at least
    one). Raises FileNotFoundError naming the apt command when a font is missing."""
    wanted = DEFAULT_FONTS if not names else tuple(names)
    found: dict[str, str] = {}
    seen = 0
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            subdirs.sort()
            for f in sorted(files):
                found.setdefault(f, os.path.join(root, f))
            seen += len(files)
            if seen > _MAX_WALK:
                break
    paths = [n if os.path.isfile(n) else found.get(os.path.basename(n)) for n in wanted]
    missing = [n for n, p in zip(wanted, paths) if p is None]
    if names and missing:
        raise FileNotFoundError(f"fonts {missing} not found under {list(dirs)}; install them "
                                f"with `{APT_COMMAND}` (as root) or name other files")
    paths = [p for p in paths if p is not None]
    if not paths:
        raise FileNotFoundError(f"no Korean font found under {list(dirs)} (looked for "
                                f"{', '.join(DEFAULT_FONTS[:3])}, ...); install them with "
                                f"`{APT_COMMAND}` (as root)")
    return paths


def font_records(paths: list[str]) -> list[dict]:
    """File name, size and sha256 of each font: what a reader needs to know which glyphs
    the set was drawn with."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append({"file": os.path.basename(p), "bytes": os.path.getsize(p),
                    "sha256": h.hexdigest()})
    return out


def versions() -> dict:
    """The library versions that determine the rendered bytes."""
    import PIL
    from PIL import features
    return {"pillow": PIL.__version__, "freetype": features.version("freetype2"),
            "libjpeg": features.version("jpg"),
            "libjpeg_turbo": features.version("libjpeg_turbo")}


_FONTS: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
_BASE: dict[str, int] = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    key = (path, size)
    if key not in _FONTS:  # per process: a face costs a file open and FreeType's set-up
        _FONTS[key] = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
    return _FONTS[key]


def _base_size(path: str) -> int:
    """The font size at which the reference syllables' ink is ``_INK_HEIGHT`` px tall."""
    if path not in _BASE:
        f = _font(path, 100)
        boxes = [f.getbbox(ch) for ch in _REFERENCE]
        height = max(b[3] for b in boxes) - min(b[1] for b in boxes)
        if height <= 0:
            raise ValueError(f"font {path} draws none of {_REFERENCE!r}: not a Hangul font")
        _BASE[path] = max(8, round(100 * _INK_HEIGHT / height))
    return _BASE[path]


_C = (SIZE - 1) / 2.0


def _glyph(ch: str, path: str, size: int) -> Image.Image:
    f = _font(path, size)
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    b = draw.textbbox((0, 0), ch, font=f)
    draw.text(((SIZE - b[0] - b[2]) // 2, (SIZE - b[1] - b[3]) // 2), ch, font=f, fill=255)
    if mask.getbbox() is None:
        raise ValueError(f"font {os.path.basename(path)} has no glyph for {ch!r} "
                         f"(U+{ord(ch):04X}); leave it out of --fonts")
    return mask


def _warp(mask: Image.Image, r: np.random.Generator) -> Image.Image:
    angle = math.radians(r.normal(0, 5))
    scale = math.exp(r.normal(0, 0.07))
    shear = r.normal(0, 0.1)
    tx, ty = r.normal(0, 3.5, 2)
    ca, sa = math.cos(angle), math.sin(angle)
    # forward map about the centre: out = A (in - c) + c + t, A = rotation . shear . scale;
    # PIL's AFFINE wants the inverse, output pixel -> input pixel
    a = np.array([[ca, -sa], [sa, ca]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inv = np.linalg.inv(a)
    off = np.array([_C, _C]) - inv @ np.array([_C + tx, _C + ty])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return mask.transform((SIZE, SIZE), Image.AFFINE, tuple(float(c) for c in coeffs),
                          resample=Image.BILINEAR, fillcolor=0)


def render_syllable(ch: str, fonts: list[str], r: np.random.Generator, noise: float) -> bytes:
    """JPEG bytes of one image of the syllable ``ch`` (a random font of ``fonts`` and the
    augmentations of the module docstring); every draw is taken from ``r``."""
    path = fonts[int(r.integers(len(fonts)))]
    mask = _glyph(ch, path, _base_size(path) + int(r.integers(-6, 7)))
    stroke = r.random()
    if stroke < 0.2:
        mask = mask.filter(ImageFilter.MaxFilter(3))
    elif stroke < 0.35:
        mask = mask.filter(ImageFilter.MinFilter(3))
    mask = _warp(mask, r)
    radius = r.uniform(0, 1.2)
    if radius > 0.3:
        mask = mask.filter(ImageFilter.GaussianBlur(radius))
    alpha = np.asarray(mask, dtype=np.float32) * np.float32(1 / 255)
    bg = np.clip(r.uniform(0.45, 0.95) * 255 + r.normal(0, 10, 3), 0, 255)
    ink = np.clip(bg - r.uniform(0.35, 0.85) * 255 + r.normal(0, 10, 3), 0, 255)
    if r.random() < 0.2:
        bg, ink = 255 - bg, 255 - ink
    bg, ink = bg.astype(np.float32), ink.astype(np.float32)
    x = bg + alpha[..., None] * (ink - bg)
    bank = noise_bank()
    start = int(r.integers(bank.size - x.size))
    x += bank[start:start + x.size].reshape(x.shape) * np.float32(r.uniform(1, noise))
    x += np.float32(0.5)
    np.clip(x, 0, 255, out=x)
    buf = io.BytesIO()
    Image.fromarray(x.astype(np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
