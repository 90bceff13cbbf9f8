"""SynthSOD scene internals: object shapes, scene planning and rendering primitives.

What :func:`sodlib.data.synth.generate_image` composes: per-class unit shapes (``_unit_shape``) placed and
drawn as polygon/circle/ring/pie parts (``_place``, ``_extent``, ``_draw``), the placement state with
its overlap and visibility rules (``_Scene``, ``_populate``), the textured ground, roads and parking
lots (``_ground``, ``_roads``), unlabelled clutter (``_clutter``), sensor noise (``_noise_tile``), and
the colour and size tables they draw from. Class indices are 0-based into ``sodlib.data.synth.CLASSES``.
Every function draws from the ``np.random.Generator`` it is given, in a fixed order: changing that
order changes the generated images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_CLASS_P = (0.26, 0.18, 0.16, 0.12, 0.11, 0.17)
_CLASS_SCALE = (0.92, 1.0, 1.2, 0.98, 0.98, 1.3)  # relative box sqrt-area per class
_BASE_COLOR = ((178, 36, 40), (202, 96, 44), (40, 70, 170), (222, 223, 218), (218, 197, 130), (196, 200, 210))
_GROUND = ((95, 124, 66), (150, 143, 96), (140, 116, 86), (132, 132, 127), (82, 98, 62))
_ROOF = ((150, 150, 150), (92, 92, 97), (160, 90, 66), (120, 96, 76), (198, 194, 184))
_CLUTTER = ((100, 110, 60), (110, 80, 55), (60, 70, 80), (150, 170, 130))
_SIZE_MU, _SIZE_SIGMA_IMG, _SIZE_SIGMA_OBJ = 3.29, 0.3, 0.65  # log box sqrt-area, px
_SIZE_SIGMA_CLUSTER = 0.65
_COUNT_MU = float(np.log(24))  # log objects per image (median)
_MIN_SQRT_AREA = 6.0


# ----------------------------------------------------------------------------- shapes (unit length)


def _chamfer_rect(x0, x1, hw, c):
    return np.array(
        [
            (x1 - c, -hw),
            (x1, -hw + c),
            (x1, hw - c),
            (x1 - c, hw),
            (x0 + c, hw),
            (x0, hw - c),
            (x0, -hw + c),
            (x0 + c, -hw),
        ],
        dtype=np.float64,
    )


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
            det = [
                ("poly", _rect(-0.24, 0.13, 0.8 * hw), _shade(body, 1.15, 12)),
                ("poly", _rect(0.13, 0.29, 0.8 * hw), dark),
                ("poly", _rect(-0.37, -0.24, 0.75 * hw), dark),
            ]
        else:
            det = [
                ("poly", _rect(-0.44, 0.32, 0.78 * hw), _shade(body, 1.0, 45)),
                ("poly", _rect(0.35, 0.45, 0.82 * hw), dark),
            ]
        return out, det
    if cls == 2:  # truck: blue cab + white ribbed trailer with a gap
        hw = 0.5 / rng.uniform(3.0, 3.9)
        cargo = _jitter(rng, (222, 222, 216), 6)
        out = [
            ("poly", _chamfer_rect(0.30, 0.5, 0.9 * hw, 0.3 * hw), body),
            ("poly", _rect(-0.5, 0.26, hw), cargo),
        ]
        ribs = [("poly", _rect(x - 0.012, x + 0.012, hw), _shade(cargo, 0.7)) for x in (-0.3, -0.1, 0.1)]
        return out, ribs + [("poly", _rect(0.43, 0.48, 0.75 * hw), dark)]
    if cls in (3, 4):  # tank / silo: same disc, ring vs shaded dome
        out = [("circle", (0.0, 0.0, 0.5), body)]
        if cls == 3:
            ring = _jitter(rng, (95, 95, 100), 5)
            return out, [("ring", (0.0, 0.0, 0.36, 0.08), ring), ("circle", (0.0, 0.0, 0.08), ring)]
        hl = np.deg2rad(sun_deg)  # lit side and highlight face the sun, the far half is shaded
        return out, [
            ("pie", (0.0, 0.0, 0.5, sun_deg + 90, sun_deg + 270), _shade(body, 0.8)),
            ("circle", (0.2 * np.cos(hl), 0.2 * np.sin(hl), 0.1), _shade(body, 1.12, 20)),
        ]
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
    pts = [
        geo
        if kind == "poly"
        else np.array([[geo[0] - geo[2], geo[1] - geo[2]], [geo[0] + geo[2], geo[1] + geo[2]]])
        for kind, geo, _ in parts
    ]
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
        if self.inside is not None and not (
            (b[:2] >= self.inside[:2]).all() and (b[2:] <= self.inside[2:]).all()
        ):
            return None
        if self.keep_out is not None and self.inside is None and _inter(self.keep_out[None], b)[0] > 0:
            return None
        if len(self.boxes):
            inter = _inter(self.boxes, c)
            old = np.prod(self.boxes[:, 2:] - self.boxes[:, :2], 1)
            new = (c[2] - c[0]) * (c[3] - c[1])
            if (
                (inter > 0.45 * old).any()
                or (inter > 0.6 * new).any()
                or (inter / (old + new - inter) > 0.4).any()
            ):
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
            x, y, th = (
                anchors[rng.integers(len(anchors))]
                if anchors and rng.random() < 0.6
                else (*rng.uniform(lo, hi, 2), rng.uniform(0, np.pi))
            )
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
        poly = _place([("poly", _rect(-w[0] / 2, w[0] / 2, w[1] / 2), 0)], 1.0, th, *rng.uniform(0, h, 2))[0][
            1
        ]
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
        draw.line(
            [a[0] * k, a[1] * k, b[0] * k, b[1] * k], fill=_jitter(rng, (92, 92, 96), 5), width=int(w * k)
        )
        dash = rng.uniform(3, 6)
        for i in range(int(4 * size / (2 * dash))):  # dashed centre line
            p, q = a + d * 2 * dash * i, a + d * (2 * i + 1) * dash
            draw.line(
                [p[0] * k, p[1] * k, q[0] * k, q[1] * k], fill=(215, 212, 200), width=max(1, int(k * 0.7))
            )
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
        parts = [
            ("poly", _rect(-0.5, 0.5, rng.uniform(0.3, 0.5)), roof),
            ("poly", _rect(-0.5, 0.5, 0.015), _shade(roof, 0.75)),
        ]
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
            items.append(
                [("circle", (p[0], p[1], r), col), ("circle", (hl[0], hl[1], 0.5 * r), _shade(col, 1.2, 8))]
            )
            if r > 6:
                sc.blocked.append(np.array([p[0] - r / 2, p[1] - r / 2, p[0] + r / 2, p[1] + r / 2]))
    for _ in range(rng.integers(3, 25)):  # rocks / debris
        k = rng.integers(4, 7)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * rng.uniform(1.0, 4.5) * rng.uniform(0.6, 1.0, (k, 1))
        items.append([("poly", pts + rng.uniform(0, size, 2), _jitter(rng, (120, 115, 105), 25))])
    for _ in range(rng.integers(0, 6)):  # containers: car-like rectangles in non-class colours
        s = sc.sample_size(0) * 0.9
        parts = [
            (
                "poly",
                _rect(-0.5, 0.5, 0.5 / rng.uniform(1.5, 3.0)),
                _jitter(rng, _CLUTTER[rng.integers(4)], 8),
            )
        ]
        items.append(_place(parts, s, rng.uniform(0, np.pi), *rng.uniform(0, size, 2)))
    return items


# ----------------------------------------------------------------------------- sensor noise

_NOISE: dict[str, np.ndarray] = {}


def _noise_tile(rng, size):
    """A size x size x 3 crop (random offset) of a fixed int8 N(0, 16²) tile: cheap sensor noise."""
    if "tile" not in _NOISE:
        _NOISE["tile"] = np.clip(np.random.default_rng(7).normal(0, 16, (512, 512, 3)), -127, 127).astype(
            np.int8
        )
    tile = _NOISE["tile"]
    if size > 512:
        tile = np.tile(tile, (size // 512 + 1, size // 512 + 1, 1))
    oy, ox = rng.integers(0, tile.shape[0] - size + 1, 2)
    return tile[oy : oy + size, ox : ox + size]
