"""Synthetic chest radiographs: a patient's anatomy, the findings drawn on it, and the film's acquisition.

A :class:`ChestAnatomy` (body outline, two lung fields, ribs, clavicles, mediastinum and heart, vessel texture) is
drawn once per patient, so every film of a patient shows the same chest; each film then varies in positioning,
exposure, contrast, blur and noise. Findings are drawn only where named, so a label is never given to an image
that does not show it:

| finding | drawn as |
|---|---|
| consolidation | one dense, large, irregular lobar patch inside a lung (bacterial pneumonia) |
| patchy | several faint patches, often in both lungs (viral / interstitial pneumonia) |
| cardiomegaly | a heart about 1.5× wider (cardiothoracic ratio above one half) |
| effusion | fluid filling a lung base with a meniscus rising laterally (blunted costophrenic angle) |
| nodule | one to three small, round, well-defined opacities |
| mass | one large, lobulated round opacity |
| pneumothorax | a lung edge (visceral pleural line) with dark air and no vessel markings beyond it |

Normal films carry look-alike confounders (breast shadows, a bright hilar vessel bundle), so tasks are learnable but
not trivial.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from medq.data.phantoms_draw import ellipse_r2, smooth_noise, soft

FINDINGS = ("consolidation", "patchy", "cardiomegaly", "effusion", "nodule", "mass", "pneumothorax")
CAUSE_FINDINGS = {"normal": (), "bacteria": ("consolidation",), "virus": ("patchy",)}

Ellipse = tuple[float, float, float, float, float]  # cy, cx, ry, rx (fractions of the size), angle (radians)


@dataclass(frozen=True)
class ChestAnatomy:
    """One patient's chest, in fractions of the image size: shared by every film of the patient."""

    air: float
    body: Ellipse
    body_density: float
    lungs: tuple[Ellipse, Ellipse]  # image left, image right
    lung_darkness: float
    vessel_density: float
    rib_period: float
    rib_curve: float
    rib_threshold: float
    rib_density: float
    clavicle_density: tuple[float, float]
    mediastinum_rx: float
    heart: Ellipse
    heart_density: float
    breast_density: float  # 0: no breast shadows
    hilum_side: int
    hilum_density: float
    texture_seed: int


def chest_anatomy(rng: np.random.Generator) -> ChestAnatomy:
    u = rng.uniform
    lungs = tuple((u(0.48, 0.55), 0.5 + side * u(0.17, 0.22), u(0.26, 0.32), u(0.12, 0.16), side * u(0.05, 0.2))
                  for side in (-1, 1))
    return ChestAnatomy(
        air=u(0.02, 0.08), body=(u(0.55, 0.62), u(0.47, 0.53), u(0.52, 0.62), u(0.40, 0.47), 0.0),
        body_density=u(0.38, 0.5), lungs=lungs, lung_darkness=u(0.22, 0.32), vessel_density=u(0.03, 0.08),
        rib_period=u(0.075, 0.095), rib_curve=u(0.06, 0.1), rib_threshold=u(0.3, 0.55), rib_density=u(0.05, 0.11),
        clavicle_density=(u(0.08, 0.16), u(0.08, 0.16)), mediastinum_rx=u(0.06, 0.08),
        heart=(u(0.62, 0.68), u(0.52, 0.56), u(0.11, 0.15), u(0.12, 0.17), u(-0.5, -0.2)),
        heart_density=u(0.3, 0.42), breast_density=u(0.03, 0.07) if rng.random() < 0.5 else 0.0,
        hilum_side=int(rng.choice([-1, 1])), hilum_density=u(0.03, 0.1), texture_seed=int(rng.integers(2**31)),
    )


def _ellipse(h: int, w: int, e: Ellipse, scale_y: float = 1.0, scale_x: float = 1.0) -> np.ndarray:
    cy, cx, ry, rx, angle = e
    return ellipse_r2(h, w, cy * h, cx * w, ry * h * scale_y, rx * w * scale_x, angle)


def _point_in(rng: np.random.Generator, mask: np.ndarray, level: float) -> tuple[int, int]:
    """A random pixel where ``mask`` exceeds ``level`` of its maximum."""
    ys, xs = np.nonzero(mask >= level * float(mask.max()))
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


def draw_chest(rng: np.random.Generator, size: int, cause: str = "normal", *, findings=(),
               anatomy: ChestAnatomy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1] of shape [size, size], the airspace opacities drawn, aligned with the image).

    ``cause`` ('normal' | 'bacteria' | 'virus') is the Kaggle pneumonia shorthand for findings consolidation /
    patchy; ``findings`` names any of :data:`FINDINGS`; ``anatomy`` is the patient's (drawn from ``rng`` if None).
    """
    wanted = set(findings) | set(CAUSE_FINDINGS[cause])
    unknown = wanted - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown chest finding {sorted(unknown)[0]!r}; known: {', '.join(FINDINGS)}")
    a = anatomy if anatomy is not None else chest_anatomy(rng)
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), a.air, dtype=np.float32)
    img += soft(_ellipse(h, w, a.body), 0.05) * a.body_density

    # Lung fields; a pneumothorax collapses one lung away from the chest wall (the air beyond shows no markings).
    lung_masks = [soft(_ellipse(h, w, e), 0.12) for e in a.lungs]
    marked = list(lung_masks)  # where vessel markings are drawn
    pneumo_side = int(rng.integers(2)) if "pneumothorax" in wanted else -1
    img -= np.maximum(*lung_masks) * a.lung_darkness
    if pneumo_side >= 0:
        cy, cx, ry, rx, angle = a.lungs[pneumo_side]
        side = -1 if pneumo_side == 0 else 1
        shrink_x, shrink_y = rng.uniform(0.4, 0.65), rng.uniform(0.75, 0.9)
        collapsed_e = (cy + ry * (1 - shrink_y) * 0.5, cx - side * rx * (1 - shrink_x) * 0.9, ry * shrink_y,
                       rx * shrink_x, angle)
        r2 = _ellipse(h, w, collapsed_e)
        marked[pneumo_side] = soft(r2, 0.08) * lung_masks[pneumo_side]
        beyond = np.clip(lung_masks[pneumo_side] - soft(r2, 0.08), 0, 1)
        img -= beyond * rng.uniform(0.1, 0.14)
        pleural_line = np.exp(-((np.sqrt(r2) - 1.0) / 0.05) ** 2) * (lung_masks[pneumo_side] > 0.5)
        img += pleural_line.astype(np.float32) * rng.uniform(0.1, 0.16)
    lungs = np.maximum(*lung_masks)

    texture = np.random.default_rng(a.texture_seed)
    vessels = np.clip(smooth_noise(texture, h, w, size / 24), 0, None) ** 2
    vessel_term = np.maximum(*marked) * vessels * a.vessel_density
    img += vessel_term

    rib_period = h * a.rib_period
    curve = ((xx - w / 2) / (w / 2)) ** 2 * h * a.rib_curve
    ribs = (np.cos(2 * np.pi * (yy + curve) / rib_period) > a.rib_threshold).astype(np.float32)
    ribs = cv2.GaussianBlur(ribs, (0, 0), max(0.6, size / 160))
    img += ribs * lungs * a.rib_density
    for side, density in zip((-1, 1), a.clavicle_density):
        clav = ellipse_r2(h, w, h * 0.2, w * (0.5 + side * 0.18), h * 0.025, w * 0.17, side * 0.25)
        img += soft(clav, 0.3) * density

    # Mediastinum and heart; cardiomegaly widens the heart to a cardiothoracic ratio above one half.
    med = soft(ellipse_r2(h, w, h * 0.45, w * 0.5, h * 0.3, w * a.mediastinum_rx), 0.1)
    wide = rng.uniform(1.45, 1.7) if "cardiomegaly" in wanted else 1.0
    heart = soft(_ellipse(h, w, a.heart, scale_y=1.0 + (wide - 1.0) * 0.35, scale_x=wide), 0.1)
    img += np.maximum(med, heart) * a.heart_density
    # Where a lesion shows: lung not hidden behind the mediastinum and heart.
    clear = [m * (1.0 - np.maximum(med, heart)) for m in lung_masks]

    if a.breast_density:
        for side in (-1, 1):
            img += soft(ellipse_r2(h, w, h * 0.74, w * (0.5 + side * 0.22), h * 0.1, w * 0.13), 0.4) * a.breast_density
    img += soft(ellipse_r2(h, w, h * 0.47, w * (0.5 + a.hilum_side * 0.1), h * 0.05, w * 0.03), 0.5) * a.hilum_density

    # Airspace disease fills alveoli with fluid: the filled share of the lung takes soft-tissue density and hides
    # the vessel markings. Lobar consolidation: one dense, large, irregular patch; patchy (viral, interstitial):
    # several fainter, ground-glass patches, often in both lungs.
    fill = np.zeros((h, w), np.float32)
    if "consolidation" in wanted:
        side = int(rng.integers(2))
        lung = lung_masks[side]
        y, x = _point_in(rng, clear[side], 0.9)
        blob = ellipse_r2(h, w, y, x, h * rng.uniform(0.08, 0.16), w * rng.uniform(0.06, 0.12), rng.uniform(0, np.pi))
        blob = blob * (1.0 + 0.35 * smooth_noise(rng, h, w, size / 10))  # ill-defined, irregular outline
        grain = 0.8 + 0.2 * smooth_noise(rng, h, w, size / 12)
        fill = np.maximum(fill, soft(blob, 0.6) * grain * lung * rng.uniform(0.9, 1.4))
    if "patchy" in wanted:
        patches = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(4, 8)):
            lung = lung_masks[rng.integers(2)]
            y, x = _point_in(rng, lung, 0.8)
            blob = ellipse_r2(h, w, y, x, h * rng.uniform(0.05, 0.09), w * rng.uniform(0.04, 0.08),
                              rng.uniform(0, np.pi))
            patches = np.maximum(patches, soft(blob, 0.6) * lung * rng.uniform(0.5, 0.9))
        fill = np.maximum(fill, patches * (0.7 + 0.3 * smooth_noise(rng, h, w, size / 20)))
    opacity = fill * a.lung_darkness
    img += opacity - fill * vessel_term

    if "effusion" in wanted:  # fluid in a lung base: meniscus higher at the chest wall, angle blunted
        sides = [0, 1] if rng.random() < 0.3 else [int(rng.integers(2))]
        for s in sides:
            cy, cx, ry, rx, _ = a.lungs[s]
            outward = np.clip((xx / w - cx) * (-1 if s == 0 else 1) / rx, 0, None)  # toward the chest wall
            level = h * (cy + ry * rng.uniform(0.2, 0.5)) - outward * h * ry * rng.uniform(0.15, 0.3)
            fluid = 1.0 / (1.0 + np.exp(-(yy - level) / max(0.6, size / 120)))
            img += lung_masks[s] * fluid * (a.lung_darkness * rng.uniform(0.8, 1.0) + 0.04)
    for kind, count, radius, density in (("nodule", rng.integers(1, 4), (0.035, 0.05), (0.2, 0.3)),
                                         ("mass", 1, (0.07, 0.11), (0.2, 0.3))):
        if kind not in wanted:
            continue
        for _ in range(int(count)):
            y, x = _point_in(rng, clear[int(rng.integers(2))], 0.95)
            r = size * rng.uniform(*radius)
            r2 = ellipse_r2(h, w, y, x, r * rng.uniform(0.85, 1.15), r, rng.uniform(0, np.pi))
            if kind == "mass":  # lobulated outline
                r2 = r2 * (1.0 + 0.15 * smooth_noise(rng, h, w, max(2.0, r / 2)))
            img += soft(r2, 0.1) * rng.uniform(*density)  # sharp, homogeneous: unlike airspace disease

    # Acquisition: exposure/contrast (gamma), positioning, blur, quantum noise.
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-4, 4), rng.uniform(0.95, 1.05))
    img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    opacity = cv2.warpAffine(opacity, m, (w, h), borderMode=cv2.BORDER_CONSTANT)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0))
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    return np.clip(img, 0, 1), opacity
