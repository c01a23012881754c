"""Pictures of the demo scenes: coloured handwritten digits on a dark gradient, encoded as the official files."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import numpy as np
from PIL import Image

from ecoflap_pl.demo.data.scenes import COLOURS, Scene


def digit_glyphs(images: np.ndarray) -> list[Image.Image]:
    """scikit-learn's 8x8 grey levels 0..16 as 10x10 uint8 images with a blank border, so upscaled strokes fade out
    at the edges."""
    return [Image.fromarray(np.pad(image * (255 / 16), 1).round().astype(np.uint8)) for image in images]


def render_scene(scene: Scene, glyphs: Sequence[Image.Image], image_size: int, rng: np.random.Generator) -> Image.Image:
    """A dark background with a random gradient; each digit's grey level is the alpha of its colour."""
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    slope = rng.uniform(-12.0, 12.0, size=(2, 3)).astype(np.float32)
    base = rng.uniform(12.0, 40.0, size=3).astype(np.float32)
    canvas = base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
    for digit in scene.digits:
        glyph = glyphs[digit.sample].resize((digit.size, digit.size), Image.Resampling.BILINEAR)
        alpha = np.asarray(glyph, np.float32)[..., None] * (float(rng.uniform(0.8, 1.0)) / 255.0)
        box = canvas[digit.y : digit.y + digit.size, digit.x : digit.x + digit.size]
        box[:] = box * (1.0 - alpha) + np.asarray(COLOURS[digit.colour], np.float32) * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def encode_image(image: Image.Image, kind: str) -> bytes:
    """The bytes of ``image`` as a ``"JPEG"`` (quality 92, no chroma subsampling) or ``"PNG"`` file."""
    buffer = BytesIO()
    if kind == "JPEG":
        image.save(buffer, "JPEG", quality=92, subsampling=0)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()
