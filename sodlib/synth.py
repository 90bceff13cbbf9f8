"""SynthSOD: the embedded default dataset -- aerial-like clutter with many small objects.

Every image is drawn from its own RNG, ``SeedSequence(split_seed(seed, split), spawn_key=(index,))``,
so a split is reproducible image by image and a longer split starts with the shorter one.

Scene: textured ground with fields, roads with lane markings, parking lots, and unlabelled clutter
(buildings, trees, rocks, containers), all casting shadows from one sun direction. Objects (six
classes, ``CLASSES``) come in parking rows, tank farms, loose clusters and singles; later-drawn
objects occlude earlier ones, every box is the full object extent clipped to the image (COCO
``[x, y, w, h]`` in pixels). Box sizes are long-tailed: about 30 % of boxes have area < 16² and
about 70 % < 32² at the image size passed in (object sizes are in pixels, not relative).

Confusable pairs: ``car``/``van`` (same chamfered-rectangle shape, red vs orange-red, aspect
≈2.0 vs ≈2.8, car shows windscreen+rear window, van a front windscreen and a long pale roof) and
``tank``/``silo`` (same disc, light grey vs cream, tank has a dark concentric ring and centre dot,
silo a shaded dome with a highlight). ``truck`` (blue cab + white ribbed trailer) and ``plane``
(swept-wing cross) stand apart by shape.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sodlib.runs import atomic_write_bytes, atomic_write_json

GENERATOR_VERSION = "synthsod-1"
CLASSES: tuple[str, ...] = ("car", "van", "truck", "tank", "silo", "plane")
_CLASS_P = (0.26, 0.18, 0.16, 0.12, 0.11, 0.17)
_CLASS_SCALE = (0.92, 1.0, 1.2, 0.98, 0.98, 1.3)  # relative box sqrt-area per class
_BASE_COLOR = ((178, 36, 40), (202, 96, 44), (40, 70, 170), (222, 223, 218), (218, 197, 130),
               (196, 200, 210))
_GROUND = ((95, 124, 66), (150, 143, 96), (140, 116, 86), (132, 132, 127), (82, 98, 62))
_ROOF = ((150, 150, 150), (92, 92, 97), (160, 90, 66), (120, 96, 76), (198, 194, 184))
_CLUTTER = ((100, 110, 60), (110, 80, 55), (60, 70, 80), (150, 170, 130))
_SIZE_MU, _SIZE_SIGMA_IMG, _SIZE_SIGMA_OBJ = 3.29, 0.3, 0.65  # log box sqrt-area, px
_SIZE_SIGMA_CLUSTER = 0.65
_COUNT_MU = float(np.log(24))  # log objects per image (median)
_MIN_SQRT_AREA = 6.0


def split_seed(seed: int, split: str) -> int:
    """Seed of a split: train and val of the same base seed get unrelated streams."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([int(seed), zlib.crc32(split.encode())]).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: fits any JSON/int64 reader


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Per-image seed sequence derived from (base seed, split, index)."""
    return np.random.SeedSequence(split_seed(seed, split), spawn_key=(int(index),))


# ----------------------------------------------------------------------------- shapes (unit length)

def _chamfer_rect(x0, x1, hw, c):
    return np.array([(x1 - c, -hw), (x1, -hw + c), (x1, hw - c), (x1 - c, hw),
                     (x0 + c, hw), (x0, hw - c), (x0, -hw + c), (x0 + c, -hw)], dtype=np.float64)


def _rect(x0, x1, hw):
    return np.array([(x0, -hw), (x1, -hw), (x1, hw), (x0, hw)], dtype=np.float64)


def _jitter(rng, rgb, sd=9.0, lo=0.86, hi=1.08):
    f, e = rng.uniform(lo, hi), rng.normal(0, sd, 3).tolist()
    return tuple(min(255, max(0, int(v * f + d))) for v, d in zip(rgb, e))


def _shade(rgb, f, add=0):
    return tuple(int(min(255, max(0, v * f + add))) for v in rgb)


def _unit_shape(cls: int, rng, sun_deg: float):
    """(outline parts, detail parts) of one object, length 1 along +x, centred at the origin.

    Parts: ('poly', pts, rgb) or ('circle', (x, y, r), rgb) or ('ring', (x, y, r, width), rgb)
    or ('pie', (x, y, r, start_deg, end_deg), rgb); the outline alone defines box and shadow.
    """
    body = _jitter(rng, _BASE_COLOR[cls])
    dark = _jitter(rng, (38, 42, 52), 4)
    if cls in (0, 1):  # car / van: same shape, different aspect ratio and roof pattern
        hw = 0.5 / (rng.uniform(1.8, 2.2) if cls == 0 else rng.uniform(2.55, 3.1))
        out = [("poly", _chamfer_rect(-0.5, 0.5, hw, 0.5 * hw), body)]
        if cls == 0:
            det = [("poly", _rect(-0.24, 0.13, 0.8 * hw), _shade(body, 1.15, 12)),
                   ("poly", _rect(0.13, 0.29, 0.8 * hw), dark), ("poly", _rect(-0.37, -0.24, 0.75 * hw), dark)]
        else:
            det = [("poly", _rect(-0.44, 0.32, 0.78 * hw), _shade(body, 1.0, 45)),
                   ("poly", _rect(0.35, 0.45, 0.82 * hw), dark)]
        return out, det
    if cls == 2:  # truck: blue cab + white ribbed trailer with a gap
        hw = 0.5 / rng.uniform(3.0, 3.9)
        cargo = _jitter(rng, (222, 222, 216), 6)
        out = [("poly", _chamfer_rect(0.30, 0.5, 0.9 * hw, 0.3 * hw), body),
               ("poly", _rect(-0.5, 0.26, hw), cargo)]
        ribs = [("poly", _rect(x - 0.012, x + 0.012, hw), _shade(cargo, 0.7)) for x in (-0.3, -0.1, 0.1)]
        return out, ribs + [("poly", _rect(0.43, 0.48, 0.75 * hw), dark)]
    if cls in (3, 4):  # tank / silo: same disc, ring vs shaded dome
        out = [("circle", (0.0, 0.0, 0.5), body)]
        if cls == 3:
            ring = _jitter(rng, (95, 95, 100), 5)
            return out, [("ring", (0.0, 0.0, 0.36, 0.08), ring), ("circle", (0.0, 0.0, 0.08), ring)]
        hl = np.deg2rad(sun_deg)  # lit side and highlight face the sun, the far half is shaded
        return out, [("pie", (0.0, 0.0, 0.5, sun_deg + 90, sun_deg + 270), _shade(body, 0.8)),
                     ("circle", (0.2 * np.cos(hl), 0.2 * np.sin(hl), 0.1), _shade(body, 1.12, 20))]
    # plane: fuselage, swept wings, tailplane
    hw = rng.uniform(0.055, 0.07)
    span = rng.uniform(0.42, 0.5)
    fus = np.array([(0.5, 0), (0.42, -hw), (-0.45, -hw), (-0.5, 0), (-0.45, hw), (0.42, hw)])
    wing = np.array([(0.14, 0), (-0.12, span), (-0.2, span), (-0.06, 0), (-0.2, -span), (-0.12, -span)])
    tail = np.array([(-0.36, 0), (-0.46, 0.17), (-0.5, 0.17), (-0.47, 0), (-0.5, -0.17), (-0.46, -0.17)])
    wcol = _shade(body, 0.9)
    out = [("poly", wing, wcol), ("poly", tail, wcol), ("poly", fus, body)]
    eng = [("poly", _rect(0.0, 0.1, 0.03) + (0, s * 0.22), _shade(body, 0.55)) for s in (-1, 1)]
    return out, eng


def _place(parts, scale, angle, cx, cy):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * scale
    placed = []
    for kind, geo, rgb in parts:
        if kind == "poly":
            placed.append((kind, geo @ rot.T + (cx, cy), rgb))
        else:
            x, y = rot @ np.asarray(geo[:2]) + (cx, cy)
            if kind == "pie":
                rest = (geo[3] + np.rad2deg(angle), geo[4] + np.rad2deg(angle))
            else:
                rest = tuple(v * scale for v in geo[3:])  # ring width scales with the object
            placed.append((kind, (x, y, geo[2] * scale) + rest, rgb))
    return placed


def _extent(parts):
    """xyxy extent of placed outline parts."""
    pts = [geo if kind == "poly" else np.array([[geo[0] - geo[2], geo[1] - geo[2]], [geo[0] + geo[2], geo[1] + geo[2]]])
           for kind, geo, _ in parts]
    pts = pts[0] if len(pts) == 1 else np.concatenate(pts)
    return np.concatenate([pts.min(0), pts.max(0)])


def _draw(draw, parts, k=2.0, offset=(0.0, 0.0), fill=None):
    """Draw placed parts scaled by k (supersampling), optionally shifted and single-coloured."""
    ox, oy = offset
    for kind, geo, rgb in parts:
        col = rgb if fill is None else fill
        if kind == "poly":
            draw.polygon(((geo + (ox, oy)) * k).ravel().tolist(), fill=col)
            continue
        x, y, r = (geo[0] + ox) * k, (geo[1] + oy) * k, geo[2] * k
        box = [x - r, y - r, x + r, y + r]
        if kind == "circle":
            draw.ellipse(box, fill=col)
        elif kind == "ring":
            draw.ellipse(box, outline=col, width=max(1, round(geo[3] * k)))
        else:
            draw.pieslice(box, geo[3], geo[4], fill=col)


# ----------------------------------------------------------------------------- scene planning

class _Scene:
    def __init__(self, rng, size):
        self.rng, self.size = rng, size
        self.sun = rng.uniform(0, 360)
        self.sun_vec = -np.array([np.cos(np.deg2rad(self.sun)), np.sin(np.deg2rad(self.sun))])
        self.img_log_scale = rng.normal(0, _SIZE_SIGMA_IMG)
        self.objects: list[tuple[int, list, list, np.ndarray]] = []  # cls, outline, details, xyxy
        self.boxes = np.zeros((0, 4))
        self.blocked: list[np.ndarray] = []  # xyxy areas objects may not be centred in
        self.keep_out: np.ndarray | None = None  # ignore region: regular objects stay outside
        self.inside: np.ndarray | None = None  # when set, objects must lie fully inside this box

    def sample_size(self, cls, cluster_log=0.0, sd=None):
        sd = _SIZE_SIGMA_OBJ if sd is None else sd
        s = np.exp(_SIZE_MU + self.img_log_scale + cluster_log + self.rng.normal(0, sd)) * _CLASS_SCALE[cls]
        if s < _MIN_SQRT_AREA:
            s = self.rng.uniform(_MIN_SQRT_AREA, _MIN_SQRT_AREA + 2)
        return min(s, 0.25 * self.size, 110.0)

    def try_add(self, cls, cx, cy, sqrt_area, angle):
        """Place one object if the constraints allow; returns its (length, width) in px, else None."""
        if not (0 < cx < self.size and 0 < cy < self.size):  # would be < 60 % inside anyway
            return None
        if any(z[0] < cx < z[2] and z[1] < cy < z[3] for z in self.blocked):
            return None
        if cls in (3, 4):
            angle = 0.0  # discs: keep the dome shading aligned with the sun
        out, det = _unit_shape(cls, self.rng, self.sun)
        local = _extent(out)
        ub = _extent(_place(out, 1.0, angle, 0, 0))
        scale = sqrt_area / np.sqrt((ub[2] - ub[0]) * (ub[3] - ub[1]))
        b = ub * scale + (cx, cy, cx, cy)
        area = (b[2] - b[0]) * (b[3] - b[1])
        c = np.clip(b, 0, self.size)
        if (c[2] - c[0]) * (c[3] - c[1]) < 0.6 * area or min(c[2] - c[0], c[3] - c[1]) < 2:
            return None
        if self.inside is not None and not ((b[:2] >= self.inside[:2]).all() and (b[2:] <= self.inside[2:]).all()):
            return None
        if self.keep_out is not None and self.inside is None and _inter(self.keep_out[None], b)[0] > 0:
            return None
        if len(self.boxes):
            inter = _inter(self.boxes, c)
            old = np.prod(self.boxes[:, 2:] - self.boxes[:, :2], 1)
            new = (c[2] - c[0]) * (c[3] - c[1])
            if (inter > 0.45 * old).any() or (inter > 0.6 * new).any() or (inter / (old + new - inter) > 0.4).any():
                return None
        self.objects.append((cls, _place(out, scale, angle, cx, cy), _place(det, scale, angle, cx, cy), c))
        self.boxes = np.vstack([self.boxes, c[None]])
        return scale * (local[2] - local[0]), scale * (local[3] - local[1])


def _pick(rng, probs) -> int:
    """Index drawn with the given probabilities (a much cheaper ``rng.choice(len(p), p=p)``)."""
    u, acc = rng.random() * sum(probs), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def _inter(boxes, b):
    wh = np.clip(np.minimum(boxes[:, 2:], b[2:]) - np.maximum(boxes[:, :2], b[:2]), 0, None)
    return wh[:, 0] * wh[:, 1]


def _populate(sc: _Scene, n: int, anchors: list[tuple[float, float, float]], area=None):
    """Place up to n objects in rows, tank farms, blobs and singles, centred in ``area`` (xyxy, default
    the image). anchors: (x, y, angle) on roads and parking lots where rows and singles may start."""
    rng, size = sc.rng, sc.size
    lo, hi = (0.0, float(size)) if area is None else (area[:2], area[2:])
    start = len(sc.objects)
    for _ in range(4 * n + 8):
        left = n - (len(sc.objects) - start)
        if left <= 0:
            break
        mode = _pick(rng, (0.28, 0.1, 0.24, 0.38))
        log_c = rng.normal(0, _SIZE_SIGMA_CLUSTER)
        if mode == 0:  # parking row / queue
            cls = (0, 1, 2, 5)[_pick(rng, (0.45, 0.3, 0.15, 0.1))]
            x, y, th = anchors[rng.integers(len(anchors))] if anchors and rng.random() < 0.6 else (
                *rng.uniform(lo, hi, 2), rng.uniform(0, np.pi))
            across = rng.random() < 0.6
            d = np.array([np.cos(th), np.sin(th)])
            p, gap = np.array([x, y]), sc.sample_size(cls, log_c, 0.1)
            for _ in range(min(left, int(rng.integers(3, 12)))):
                c2 = cls if rng.random() > 0.3 or cls > 1 else 1 - cls
                ang = th + (np.pi / 2 if across else 0) + rng.normal(0, 0.06) + np.pi * (rng.random() < 0.3)
                lw = sc.try_add(c2, *(p + rng.normal(0, 0.04 * gap, 2)), sc.sample_size(c2, log_c, 0.1), ang)
                if lw is not None:  # next slot: one object width (across) or length (along) plus a gap
                    gap = lw[1] if across else lw[0]
                p = p + d * gap * rng.uniform(0.95, 1.45)
        elif mode == 1:  # tank farm: tanks and silos mixed on a grid
            x, y, th = *rng.uniform(lo, hi, 2), rng.uniform(0, np.pi / 2)
            s = sc.sample_size(3, log_c, 0.08)
            step = s * rng.uniform(1.05, 1.6)
            r, cc = rng.integers(1, 4, 2) + 1
            p_tank = rng.uniform(0.2, 0.8)
            rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
            for i in range(min(left, r * cc)):
                cls = 3 if rng.random() < p_tank else 4
                p = (x, y) + rot @ (np.array([i % cc, i // cc]) * step)
                sc.try_add(cls, *p, sc.sample_size(cls, log_c, 0.08), 0.0)
        elif mode == 2:  # loose blob: mixed classes, random poses, overlapping
            x, y = rng.uniform(lo, hi, 2)
            s = sc.sample_size(0, log_c)
            for _ in range(min(left, int(rng.integers(3, 10)))):
                cls = _pick(rng, _CLASS_P)
                p = (x, y) + rng.normal(0, s * rng.uniform(0.8, 2.0), 2)
                sc.try_add(cls, *p, sc.sample_size(cls, log_c, 0.35), rng.uniform(0, 2 * np.pi))
        else:  # single, on a road half of the time when there is one
            cls = _pick(rng, _CLASS_P)
            if anchors and cls < 3 and rng.random() < 0.5:
                x, y, th = anchors[rng.integers(len(anchors))]
                x, y = (x, y) + np.array([np.cos(th), np.sin(th)]) * rng.uniform(-size, size)
                ang = th + np.pi * (rng.random() < 0.5)
            else:
                x, y, ang = *rng.uniform(lo, hi, 2), rng.uniform(0, 2 * np.pi)
            sc.try_add(cls, x, y, sc.sample_size(cls), ang)


# ----------------------------------------------------------------------------- rendering

def _ground(rng, size):
    """Textured ground with fields, computed at half resolution (it is low-frequency), uint8."""
    h = (size + 1) // 2
    base = np.array(_GROUND[rng.integers(len(_GROUND))], np.float32) * rng.uniform(0.85, 1.12, 3)
    low = Image.fromarray(rng.integers(0, 256, (5, 5), np.uint8)).resize((h, h), Image.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).resize((h, h), Image.BILINEAR)
    mid = np.asarray(mid, np.float32) - 127.5
    img = base + (np.asarray(low, np.float32)[..., None] - 127.5) * rng.uniform(0.25, 0.55)
    img += mid.mean(-1, keepdims=True) * 0.22 + mid * 0.06
    labels = Image.new("L", (h, h), 0)
    draw = ImageDraw.Draw(labels)
    tints, n_fields = [np.zeros(3, np.float32)], int(rng.integers(0, 6))
    for k in range(1, n_fields + 1):  # fields: rotated patches with their own tint, some ploughed
        w, th = rng.uniform(0.15, 0.7, 2) * h, rng.uniform(0, np.pi)
        poly = _place([("poly", _rect(-w[0] / 2, w[0] / 2, w[1] / 2), 0)], 1.0, th, *rng.uniform(0, h, 2))[0][1]
        draw.polygon(poly.ravel().tolist(), fill=k)
        tint = (np.array(_GROUND[rng.integers(len(_GROUND))], np.float32) - base) * rng.uniform(0.4, 0.9)
        tints.append(tint)
        if rng.random() < 0.5:
            yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
            stripes = np.sin((xx * np.cos(th) + yy * np.sin(th)) * (2 * np.pi / rng.uniform(2.5, 5)))
            img += (np.asarray(labels) == k)[..., None] * (9 * stripes)[..., None]
    if n_fields:
        img += np.stack(tints)[np.asarray(labels)]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _roads(rng, size, draw, g, k=2.0):
    """Roads and parking lots drawn at scale k. Returns anchors (x, y, angle) for object rows (1x)."""
    anchors = []
    for _ in range(_pick(rng, (0.25, 0.4, 0.25, 0.1))):
        x, y, th = *rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0, np.pi)
        d = np.array([np.cos(th), np.sin(th)])
        a, b = np.array([x, y]) - 2 * size * d, np.array([x, y]) + 2 * size * d
        w = max(4.0, 26 * g * rng.uniform(0.8, 1.4))
        draw.line([a[0] * k, a[1] * k, b[0] * k, b[1] * k], fill=_jitter(rng, (92, 92, 96), 5), width=int(w * k))
        dash = rng.uniform(3, 6)
        for i in range(int(4 * size / (2 * dash))):  # dashed centre line
            p, q = a + d * 2 * dash * i, a + d * (2 * i + 1) * dash
            draw.line([p[0] * k, p[1] * k, q[0] * k, q[1] * k], fill=(215, 212, 200), width=max(1, int(k * 0.7)))
        off = np.array([-d[1], d[0]]) * w * 0.27
        anchors += [(x + off[0], y + off[1], th), (x - off[0], y - off[1], th)]
    if rng.random() < 0.4:  # parking lot with stall lines
        x, y, th = *rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, np.pi)
        L, W = rng.uniform(70, 160) * g, rng.uniform(40, 90) * g
        lot = _place([("poly", _rect(-L / 2, L / 2, W / 2), 0)], 1.0, th, x, y)[0][1]
        draw.polygon((lot * k).ravel().tolist(), fill=_jitter(rng, (112, 112, 114), 4))
        d, nrm = np.array([np.cos(th), np.sin(th)]), np.array([-np.sin(th), np.cos(th)])
        stall = 11 * g
        for i in range(int(L / stall) + 1):
            p = np.array([x, y]) + d * (-L / 2 + i * stall)
            for side in (-1, 1):
                q, r = p + nrm * side * W * 0.48, p + nrm * side * W * 0.18
                draw.line([q[0] * k, q[1] * k, r[0] * k, r[1] * k], fill=(205, 205, 198), width=1)
        for side in (-1, 1):
            q = np.array([x, y]) + nrm * side * W * 0.3 - d * L * 0.45
            anchors.append((q[0], q[1], th))
    return anchors


def _clutter(sc: _Scene, g):
    """Unlabelled distractors: buildings, trees, rocks, containers. Returns placed parts lists."""
    rng, size, items = sc.rng, sc.size, []
    for _ in range(rng.integers(0, 5)):  # buildings with a ridge line
        s = rng.uniform(25, 70) * g
        roof = _jitter(rng, _ROOF[rng.integers(len(_ROOF))], 6)
        parts = [("poly", _rect(-0.5, 0.5, rng.uniform(0.3, 0.5)), roof),
                 ("poly", _rect(-0.5, 0.5, 0.015), _shade(roof, 0.75))]
        placed = _place(parts, s, rng.uniform(0, np.pi), *rng.uniform(0, size, 2))
        items.append(placed)
        sc.blocked.append(_extent(placed[:1]))
    for _ in range(rng.integers(0, 6)):  # tree groups
        x, y = rng.uniform(0, size, 2)
        for _ in range(rng.integers(1, 8)):
            r = rng.uniform(3, 11) * g
            p = (x, y) + rng.normal(0, 8 * g, 2)
            col = _jitter(rng, (50, 84, 40), 8)
            hl = p + sc.sun_vec * -0.3 * r
            items.append([("circle", (p[0], p[1], r), col), ("circle", (hl[0], hl[1], 0.5 * r), _shade(col, 1.2, 8))])
            if r > 6:
                sc.blocked.append(np.array([p[0] - r / 2, p[1] - r / 2, p[0] + r / 2, p[1] + r / 2]))
    for _ in range(rng.integers(3, 25)):  # rocks / debris
        k = rng.integers(4, 7)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * rng.uniform(1.0, 4.5) * rng.uniform(0.6, 1.0, (k, 1))
        items.append([("poly", pts + rng.uniform(0, size, 2), _jitter(rng, (120, 115, 105), 25))])
    for _ in range(rng.integers(0, 6)):  # containers: car-like rectangles in non-class colours
        s = sc.sample_size(0) * 0.9
        parts = [("poly", _rect(-0.5, 0.5, 0.5 / rng.uniform(1.5, 3.0)), _jitter(rng, _CLUTTER[rng.integers(4)], 8))]
        items.append(_place(parts, s, rng.uniform(0, np.pi), *rng.uniform(0, size, 2)))
    return items


def generate_image(seed_seq_or_rng, size: int, ignore_regions: bool = False):
    """One SynthSOD image.

    Args:
        seed_seq_or_rng: ``np.random.SeedSequence``, ``np.random.Generator`` or int.
        size: square image side in pixels (object sizes are in pixels at this size).
        ignore_regions: when True, about a third of the images get one blurred, hazy rectangle with
            small objects inside; it is annotated once per class present inside it with the region
            box and ``iscrowd=1, ignore=1`` (the objects inside get no regular annotation).

    Returns:
        (image [size, size, 3] uint8, annotations) with each annotation a dict holding
        ``bbox`` [x, y, w, h] float pixels, ``category_id`` in 1..6, ``iscrowd``, ``ignore``.
    """
    rng = seed_seq_or_rng if isinstance(seed_seq_or_rng, np.random.Generator) else np.random.default_rng(
        seed_seq_or_rng)
    size = int(size)
    sc = _Scene(rng, size)
    g = float(np.exp(sc.img_log_scale))
    big = _ground(rng, size).resize((2 * size, 2 * size), Image.BILINEAR)  # drawn at 2x, reduced: AA
    anchors = _roads(rng, size, ImageDraw.Draw(big), g)
    clutter = _clutter(sc, g)

    region = None
    if ignore_regions and rng.random() < 0.33 and size >= 48:
        w, h = rng.uniform(0.15, 0.3, 2) * size
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        region = np.array([x, y, x + w, y + h])
        sc.keep_out = sc.inside = region
        saved, sc.img_log_scale = sc.img_log_scale, np.log(0.5)
        _populate(sc, int(rng.integers(3, 12)), [], region)
        sc.img_log_scale, sc.inside = saved, None
    n_region = len(sc.objects)
    n = 0 if rng.random() < 0.02 else int(np.clip(np.exp(rng.normal(_COUNT_MU, 0.62)), 5, 90))
    _populate(sc, min(n, size * size // 1200), anchors)

    # shadows: a 1x mask, softened, darkens the 2x ground under everything drawn afterwards
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    for parts in clutter:
        r = _extent(parts[:1])
        _draw(md, parts[:1], 1.0, sc.sun_vec * 0.25 * np.sqrt((r[2] - r[0]) * (r[3] - r[1])), 255)
    for _, out, _, b in sc.objects:
        _draw(md, out, 1.0, sc.sun_vec * (0.5 + 0.12 * np.sqrt((b[2] - b[0]) * (b[3] - b[1]))), 255)
    mask = mask.filter(ImageFilter.BoxBlur(1)).resize(big.size, Image.BILINEAR)
    f = 1 - rng.uniform(0.35, 0.55)
    big = Image.composite(big.point([int(v * f) for v in range(256)] * 3), big, mask)

    draw = ImageDraw.Draw(big)
    for parts in clutter:
        _draw(draw, parts)
    for _, out, det, _ in sc.objects:  # in placement order: later objects occlude earlier ones
        _draw(draw, out)
        _draw(draw, det)
    img = big.reduce(2)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8)))
    if region is not None:
        box = tuple(int(v) for v in np.round(region))
        crop = img.crop(box).filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5)))
        img.paste(Image.blend(crop, Image.new("RGB", crop.size, (190, 190, 190)), 0.4), box[:2])
    # global photometric (exposure, colour cast, haze) as one LUT, then sensor noise
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
    haze = rng.uniform(0.1, 0.3) if rng.random() < 0.15 else 0.0
    lut = np.clip(np.arange(256)[None] * gain[:, None] * (1 - haze) + haze * 200 + 0.5, 0, 255)
    out = np.asarray(img.point(lut.astype(np.uint8).ravel().tolist()), np.int16)
    sigma = int(rng.integers(1, 5))
    out = out + ((_noise_tile(rng, size).astype(np.int16) * sigma) >> 4)
    image = np.clip(out, 0, 255).astype(np.uint8)

    anns = []
    if region is not None:
        x0, y0, x1, y1 = (float(v) for v in region)
        for cls in sorted({o[0] for o in sc.objects[:n_region]}):
            anns.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": cls + 1, "iscrowd": 1, "ignore": 1})
    for cls, _, _, b in sc.objects[n_region:]:
        bb = [round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])]
        anns.append({"bbox": bb, "category_id": cls + 1, "iscrowd": 0, "ignore": 0})
    return image, anns


_NOISE: dict[str, np.ndarray] = {}


def _noise_tile(rng, size):
    """A size x size x 3 crop (random offset) of a fixed int8 N(0, 16²) tile: cheap sensor noise."""
    if "tile" not in _NOISE:
        _NOISE["tile"] = np.clip(np.random.default_rng(7).normal(0, 16, (512, 512, 3)), -127, 127).astype(np.int8)
    tile = _NOISE["tile"]
    if size > 512:
        tile = np.tile(tile, (size // 512 + 1, size // 512 + 1, 1))
    oy, ox = rng.integers(0, tile.shape[0] - size + 1, 2)
    return tile[oy:oy + size, ox:ox + size]


# ----------------------------------------------------------------------------- COCO splits on disk

def _info(split, num_images, size, seed, ignore_regions) -> dict:
    return {"description": "SynthSOD synthetic aerial small-object dataset (sodlib.synth)",
            "generator": GENERATOR_VERSION, "seed": int(seed), "split": str(split),
            "split_seed": split_seed(seed, split), "size": int(size), "num_images": int(num_images),
            "ignore_regions": bool(ignore_regions)}


def _same_but_count(a: dict | None, b: dict) -> bool:
    drop = ("num_images",)
    return a is not None and {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop}


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def annotation_path(out_dir, split: str) -> Path:
    return Path(out_dir) / "annotations" / f"instances_{split}.json"


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # deterministic; no metadata
    return buf.getvalue()


def write_split(out_dir, split: str, num_images: int, size: int, seed: int = 0,
                ignore_regions: bool = False, progress: bool = True, reuse: bool = False) -> Path:
    """Generate a split as ``out_dir/images/<split>/<index:06d>.png`` + ``annotations/instances_<split>.json``.

    Crash-safe and resumable: images (and per-image annotation side files) go to hidden partial
    folders first; an interrupted run leaves the previous complete split (or nothing) in place and the
    next run picks up the finished images. When the folders are complete the old json is removed,
    the image folder swapped in with ``os.replace`` and the new json written last (atomically), so a
    json never points at missing images. With ``reuse=True`` (what ``ensure_split`` does) the images
    of an existing split that differs only in ``num_images`` are hard-linked instead of redrawn (the
    prefix property makes them identical). Returns the json path.
    """
    from tqdm.auto import tqdm

    if num_images < 0 or size < 16:
        raise ValueError(f"need num_images >= 0 and size >= 16, got {num_images}, {size}")
    out_dir = Path(out_dir)
    info = _info(split, num_images, size, seed, ignore_regions)
    json_path = annotation_path(out_dir, split)
    final, partial = out_dir / "images" / split, out_dir / "images" / f".{split}.partial"
    side = out_dir / "annotations" / f".{split}.partial"
    marker = side / "params.json"
    if side.exists() and not _same_but_count(_load_json(marker), info):
        shutil.rmtree(side)
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_json(marker, info)
    old = _load_json(json_path) if reuse and final.is_dir() else None
    old_anns: dict[int, list] = {}
    if old is not None and _same_but_count(old.get("info"), info):
        for a in old["annotations"]:
            old_anns.setdefault(a["image_id"] - 1, []).append(
                {k: a[k] for k in ("bbox", "category_id", "iscrowd", "ignore")})
        old_n = len(old["images"])
    else:
        old_n = 0

    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"SynthSOD {split}", disable=not progress, unit="img"):
        name, side_file = f"{index:06d}.png", side / f"{index:06d}.json"
        anns = _load_json(side_file) if (partial / name).exists() else None
        if anns is None and index < old_n and (final / name).exists():
            _link_or_copy(final / name, partial / name)
            anns = old_anns.get(index, [])
            atomic_write_json(side_file, anns, indent=None)
        if anns is None:
            image, anns = generate_image(image_seed(seed, split, index), size, ignore_regions)
            atomic_write_bytes(partial / name, _png_bytes(image))
            atomic_write_json(side_file, anns, indent=None)  # written after its image: marks it complete
        images.append({"id": index + 1, "file_name": name, "width": int(size), "height": int(size)})
        for a in anns:
            w, h = a["bbox"][2:]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": a["category_id"],
                                "bbox": a["bbox"], "area": round(w * h, 2), "iscrowd": a["iscrowd"],
                                "ignore": a["ignore"]})
    for stale in partial.glob("*.png"):  # left over from a longer interrupted run
        if int(stale.stem) >= num_images:
            stale.unlink()
    coco = {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "synthsod"} for i, n in enumerate(CLASSES)]}
    json_path.unlink(missing_ok=True)  # from here until the last line no json exists for this split
    trash = out_dir / "images" / f".{split}.old"
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists():
        os.replace(final, trash)
    os.replace(partial, final)
    atomic_write_json(json_path, coco, indent=None)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(side, ignore_errors=True)
    return json_path


def _link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def ensure_split(out_dir, split: str, num_images: int, size: int, seed: int = 0,
                 ignore_regions: bool = False, progress: bool = True) -> Path:
    """Return the json path of a split, generating it only when it is missing, incomplete or its
    ``info`` does not match the requested parameters."""
    json_path = annotation_path(out_dir, split)
    data = _load_json(json_path)
    if data is not None and data.get("info") == _info(split, num_images, size, seed, ignore_regions):
        folder = Path(out_dir) / "images" / split
        if all((folder / im["file_name"]).exists() for im in data["images"]):
            return json_path
    return write_split(out_dir, split, num_images, size, seed, ignore_regions, progress, reuse=True)


from sodlib.datastats import box_stats, format_stats, plot_stats  # noqa: F401  (re-exported)
