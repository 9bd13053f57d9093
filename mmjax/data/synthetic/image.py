"""Chest-X-ray-like images rendered from the latent state (frontal view, grayscale).

Anatomy: body outline, two lung fields with rib shadows, spine, domed diaphragm and a heart
silhouette whose width is the cardiothoracic ratio times the thoracic width. Findings: lobar
opacities (pneumonia, and small benign atelectasis as a mimic), fluid filling a lung base with a
meniscus (effusion, which blunts the costophrenic angle), an enlarged heart. Acquisition varies
per image: rotation, zoom, shift, exposure, contrast, gamma and noise.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.synthetic.latent import PatientState

_LUNG_CX, _LUNG_RX, _LUNG_CY, _LUNG_RY = 0.36, 0.29, -0.08, 0.56
_THORAX_HALF_WIDTH = _LUNG_CX + _LUNG_RX  # lungs' outer edges


def _soft(x, width=0.02):
    """A smooth step: ~0 for x << 0, ~1 for x >> 0."""
    return 1.0 / (1.0 + np.exp(-np.clip(x / width, -30, 30)))


def _smooth_noise(rng, n, size, cells):
    """Low-frequency texture: coarse noise upsampled by bilinear interpolation. [n, size, size]"""
    coarse = rng.standard_normal((n, cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = coarse[:, i0, :] * (1 - f)[None, :, None] + coarse[:, i0 + 1, :] * f[None, :, None]
    return rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]


def render_images(state: PatientState, rng: np.random.Generator, size: int, chunk: int = 256):
    """Renders uint8[N, size, size, 1] images, `chunk` patients at a time to bound memory."""
    n = len(state.age)
    out = np.empty((n, size, size, 1), np.uint8)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        out[idx, :, :, 0] = _render_chunk(state, idx, rng, size)
    return out


def _render_chunk(s: PatientState, idx, rng, size):
    n = len(idx)
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(g, g, indexing="ij")
    # Acquisition geometry: the patient's frame (u, v) seen through rotation, zoom and shift.
    theta = np.deg2rad(rng.normal(0.0, 3.0, n)).astype(np.float32)[:, None, None]
    zoom = rng.uniform(0.9, 1.08, n).astype(np.float32)[:, None, None]
    dx, dy = (rng.normal(0.0, 0.04, (2, n)).astype(np.float32)[..., None, None])
    u = (np.cos(theta) * x + np.sin(theta) * y) / zoom - dx
    v = (-np.sin(theta) * x + np.cos(theta) * y) / zoom - dy

    body = _soft(1.0 - (u / 0.9) ** 2 - ((v - 0.05) / 1.02) ** 2, 0.05)
    img = 0.12 + 0.38 * body
    dome = 0.42 + 0.1 * np.cos(np.pi * (np.abs(u) - _LUNG_CX) / (2 * _LUNG_RX))
    below_dome = _soft(v - dome, 0.025)
    lungs = []
    for side in (-1.0, 1.0):  # image-left lung is the patient's right
        ell = 1.0 - ((u - side * _LUNG_CX) / _LUNG_RX) ** 2 - ((v - _LUNG_CY) / _LUNG_RY) ** 2
        lungs.append(_soft(ell, 0.04) * (1.0 - below_dome))
    lung = np.maximum(lungs[0], lungs[1])
    ribs = 0.035 * np.sin(22.0 * v + 3.0 * u**2) * lung
    img = img - 0.3 * lung + ribs + 0.2 * _soft(0.07 - np.abs(u), 0.02) * body

    # Heart: centred slightly to the patient's left; half-width = CTR * thoracic half-width.
    half_width = (s.cardiothoracic_ratio[idx] * _THORAX_HALF_WIDTH).astype(np.float32)[:, None, None]
    heart = _soft(1.0 - ((u - 0.07) / half_width) ** 2 - ((v - 0.2) / 0.3) ** 2, 0.04)
    img = img + 0.26 * heart * (1.0 - 0.5 * below_dome)

    texture = _smooth_noise(rng, n, size, 6)
    # Pneumonia: a blob in one lung zone, amplitude and spread growing with extent.
    ext = s.pneumonia_extent[idx] + 0.25 * s.atelectasis[idx]
    side = np.where(s.pneumonia_side[idx] == 0, -1.0, 1.0)
    cy = np.where(s.pneumonia_lower[idx], 0.2, -0.3) + rng.normal(0, 0.06, n)
    cx = side * (_LUNG_CX + rng.normal(0, 0.06, n))
    sigma = 0.08 + 0.14 * ext
    cx, cy, sigma, amp = (a.astype(np.float32)[:, None, None] for a in (cx, cy, sigma, 0.32 * ext))
    blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma**2))
    img = img + amp * blob * lung * (1.0 + 0.35 * texture)

    # Effusion: fluid up to a height above the diaphragm, higher at the lateral edge (meniscus).
    size_e = s.effusion_size[idx].astype(np.float32)[:, None, None]
    eside = s.effusion_side[idx][:, None, None]
    for k, sgn in enumerate((-1.0, 1.0)):
        on = ((eside == k) | (eside == 2)).astype(np.float32) * (size_e > 0)
        level = dome - (0.06 + 0.32 * size_e) - 0.12 * size_e * np.abs(u - sgn * _LUNG_CX) / _LUNG_RX
        fluid = _soft(v - level, 0.03) * lungs[k] / np.maximum(1.0 - below_dome, 1e-3)
        img = img + on * 0.3 * np.clip(fluid, 0, 1) * (1.0 - below_dome)

    exposure = rng.uniform(-0.06, 0.06, n).astype(np.float32)[:, None, None]
    contrast = rng.uniform(0.85, 1.15, n).astype(np.float32)[:, None, None]
    gamma = rng.uniform(0.85, 1.2, n).astype(np.float32)[:, None, None]
    img = np.clip(contrast * (img - 0.35) + 0.35 + exposure, 0.0, 1.0) ** gamma
    noise = rng.uniform(0.01, 0.035, n).astype(np.float32)[:, None, None]
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
