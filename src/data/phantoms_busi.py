"""Breast-ultrasound phantoms in the BUSI layout.

    root/{benign,malignant,normal}/benign (1).png, benign (1)_mask.png, benign (4)_mask_1.png ...

Each B-mode image is tissue echogenicity turned into speckle: layered breast anatomy from the skin down (bright skin
line, dark lobulated subcutaneous fat, brighter fibroglandular tissue, striated pectoral muscle, dark chest wall),
multiplied by complex Gaussian scatterers, blurred by an anisotropic point-spread function, envelope-detected and
log-compressed, with depth attenuation. Lesions are hypoechoic:
- benign: oval, circumscribed, wider than tall (parallel to the skin), often posterior acoustic enhancement; some
  images hold a second small benign lesion (its own ``_mask_1.png``);
- malignant: irregular, spiculated, indistinct margin, taller than wide, usually posterior acoustic shadowing;
- one lesion in four is atypical (features between the classes), so the task is learnable but not trivial;
- normal: no lesion (an all-black mask, as in BUSI).
Caliper marks ('+') sit around a share of lesions of both kinds, as on real scans, carrying no class information.
Images are written as 3-channel PNGs (as BUSI's are), a share as 8-bit grayscale; sizes vary.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from medq.data.phantoms_draw import smooth_noise, to_uint, write_image

CLASS_SHARE = {"benign": 0.56, "malignant": 0.27, "normal": 0.17}  # BUSI: 437 / 210 / 133
SECOND_LESION = 0.15
CALIPERS = 0.3
GRAY_EVERY = 7


def _wavy(rng: np.random.Generator, w: int, base: float, amplitude: float) -> np.ndarray:
    return base + amplitude * smooth_noise(rng, 1, w, max(2.0, w / 4))[0]


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity (0..1) of the layered breast, depth running down the rows."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    skin = _wavy(rng, w, h * rng.uniform(0.03, 0.05), h * 0.01)
    fat = _wavy(rng, w, h * rng.uniform(0.18, 0.3), h * 0.05)
    gland = _wavy(rng, w, h * rng.uniform(0.55, 0.7), h * 0.06)
    muscle = _wavy(rng, w, h * rng.uniform(0.8, 0.9), h * 0.03)
    echo = np.full((h, w), 0.12, np.float32)  # chest wall
    lobules = 0.22 + 0.12 * np.clip(smooth_noise(rng, h, w, max(3.0, w / 10)), -1, 1)
    glandular = 0.6 + 0.2 * smooth_noise(rng, h, w, max(2.0, w / 25))
    striations = 0.4 + 0.25 * (np.sin(yy / max(1.5, h / 60) + smooth_noise(rng, h, w, w / 3) * 2) > 0.6)
    for top, bottom, value in ((0, skin, 0.95), (skin, fat, lobules), (fat, gland, glandular),
                               (gland, muscle, striations)):
        layer = (yy >= top) & (yy < bottom)
        echo = np.where(layer, value, echo)
    return cv2.GaussianBlur(echo.astype(np.float32), (0, 0), max(0.5, w / 200))


def _lesion_mask(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, ry: float, rx: float,
                 irregularity: float, edge: float) -> np.ndarray:
    """0..1 mask of a lesion: a smooth oval at irregularity 0, lobulated and spiculated towards 1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(-0.3, 0.3)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    r, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)
    k = np.arange(2, 8)[:, None, None]
    bumps = rng.normal(0, 0.16 * irregularity, (6, 1, 1)) / (k / 2) * np.cos(k * theta + rng.uniform(0, 6.3, (6, 1, 1)))
    boundary = 1.0 + bumps.sum(0)
    for spike in rng.uniform(-np.pi, np.pi, int(round(irregularity * 16))):
        gap = np.angle(np.exp(1j * (theta - spike)))
        boundary += irregularity * rng.uniform(0.15, 0.45) * np.exp(-(gap / rng.uniform(0.04, 0.09)) ** 2)
    return np.clip((boundary - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _lesion_features(rng: np.random.Generator, malignant: bool) -> tuple[float, float, float, float]:
    """(irregularity, height/width, margin softness, posterior gain) — typical of the class three times in four;
    atypical lesions take features between the classes, as real ones do."""
    typical = rng.random() < 0.75
    if malignant:
        irregularity = rng.uniform(0.45, 1.0) if typical else rng.uniform(0.2, 0.5)
        tall = rng.uniform(1.05, 1.5) if typical else rng.uniform(0.7, 1.05)
        posterior = rng.uniform(0.3, 0.6) if rng.random() < 0.7 else rng.uniform(0.95, 1.15)
        return irregularity, tall, rng.uniform(0.08, 0.15), posterior
    irregularity = rng.uniform(0.0, 0.3) if typical else rng.uniform(0.3, 0.55)
    tall = 1 / rng.uniform(1.2, 1.8) if typical else 1 / rng.uniform(0.9, 1.25)
    posterior = rng.uniform(1.2, 1.5) if rng.random() < 0.6 else 1.0
    return irregularity, tall, rng.uniform(0.04, 0.07), posterior


def draw_ultrasound(rng: np.random.Generator, h: int, w: int, kind: str, lesions: int = 1
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image in [0, 1] [h, w], one binary mask per lesion) for kind 'normal' | 'benign' | 'malignant'."""
    echo = _tissue(rng, h, w)
    gain = np.ones((h, w), np.float32)
    masks = []
    for n in range(lesions if kind != "normal" else 0):
        malignant = kind == "malignant"
        irregularity, tall, edge, posterior = _lesion_features(rng, malignant)
        size = min(h, w) * rng.uniform(0.1, 0.19) * (0.5 if n else 1.0)
        rx, ry = size / np.sqrt(tall), size * np.sqrt(tall)
        cy, cx = h * rng.uniform(0.35, 0.6), w * rng.uniform(0.25, 0.75)
        mask = _lesion_mask(rng, h, w, cy, cx, ry, rx, irregularity, edge)
        inside = rng.uniform(0.08, 0.2) * (1 + (0.6 if malignant else 0.25) * smooth_noise(rng, h, w, 4.0))
        echo = echo * (1 - mask) + mask * inside
        # Posterior acoustic enhancement (> 1) or shadowing (< 1): a band beneath the lesion.
        column = cv2.GaussianBlur(mask.max(axis=0, keepdims=True), (0, 0), max(1.0, rx / 3))
        below = np.clip((np.arange(h, dtype=np.float32)[:, None] - cy - ry * 0.3) / (0.4 * ry), 0, 1)
        gain *= 1 + (posterior - 1) * below * np.clip(column * 1.3, 0, 1) * (1 - mask)
        masks.append((mask > 0.5).astype(np.uint8))
    echo = np.clip(echo * gain, 0, 1.2)
    # Speckle: complex Gaussian scatterers, an anisotropic point-spread blur (longer laterally), envelope detection;
    # the display is the echogenicity modulated by the normalised speckle, with depth attenuation.
    scatter = rng.standard_normal((2, h, w)).astype(np.float32)
    psf_y, psf_x = max(0.6, h / 160), max(1.0, w / 70)
    envelope = np.hypot(*(cv2.GaussianBlur(s, (0, 0), psf_x, sigmaY=psf_y) for s in scatter))
    speckle = (envelope / (envelope.mean() + 1e-6)) ** rng.uniform(0.5, 0.7)
    depth = np.exp(-rng.uniform(0.2, 0.6) * np.arange(h, dtype=np.float32) / h)[:, None]
    image = np.clip(echo * speckle * depth * rng.uniform(0.75, 0.95), 0, 1) ** rng.uniform(0.8, 1.1)
    if masks and rng.random() < CALIPERS and masks[0].any():
        ys, xs = np.nonzero(masks[0])
        for y, x in ((ys.min() - 3, xs.mean()), (ys.max() + 3, xs.mean())):
            cv2.drawMarker(image, (int(x), int(np.clip(y, 0, h - 1))), 1.0, cv2.MARKER_CROSS, max(5, w // 30), 1)
    return image.astype(np.float32), masks


def generate_busi(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128, seed: int = 7) -> dict:
    """Write n_train + n_val + n_test images (BUSI has no split of its own) and their masks."""
    root = Path(root)
    counts = {c: 0 for c in CLASS_SHARE}
    masks_written = 0
    for i in range(n_train + n_val + n_test):
        rng = np.random.default_rng([seed, 31, i])
        kind = str(rng.choice(list(CLASS_SHARE), p=list(CLASS_SHARE.values())))
        h, w = int(size * rng.uniform(0.85, 1.1)), int(size * rng.uniform(1.0, 1.3))
        lesions = 2 if kind == "benign" and rng.random() < SECOND_LESION else 1
        image, masks = draw_ultrasound(rng, h, w, kind, lesions)
        counts[kind] += 1
        stem = f"{kind} ({counts[kind]})"
        pixels = to_uint(image)
        if i % GRAY_EVERY != GRAY_EVERY - 1:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        write_image(root / kind / f"{stem}.png", pixels)
        for n, mask in enumerate(masks or [np.zeros((h, w), np.uint8)]):
            write_image(root / kind / (f"{stem}_mask.png" if n == 0 else f"{stem}_mask_{n}.png"), mask * 255)
            masks_written += 1
    return {"images": sum(counts.values()), "counts": {"all": counts}, "masks": masks_written}
