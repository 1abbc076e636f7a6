"""Geometry kernels for the phantom: smooth random fields and approximate signed distances.

All coordinates are in mm in the phantom's anatomical frame (x toward the patient's right,
y anterior, z superior: RAS). Signed distances are negative inside a shape. Volumes are
built in the canonical (R, A, S) voxel order on a regular grid, one z-slab at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32 = np.float32


def bspline_taps(coords_mm: np.ndarray, start_mm: float, step_mm: float, n_nodes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps: node indices ``(n, 4)`` and weights ``(n, 4)`` (float32, sum 1 per row).

    Node ``m`` sits at ``start_mm + m * step_mm``; nodes past the ends are clamped to the edge.
    """
    u = (np.asarray(coords_mm, np.float64) - start_mm) / step_mm
    i = np.floor(u).astype(np.int64)
    f = u - i
    w = np.stack([(1 - f) ** 3 / 6, (3 * f ** 3 - 6 * f ** 2 + 4) / 6,
                  (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6, f ** 3 / 6], axis=1)
    idx = np.clip(i[:, None] - 1 + np.arange(4)[None, :], 0, n_nodes - 1)
    return idx, w.astype(F32)


def bspline_weights(coords_mm: np.ndarray, start_mm: float, step_mm: float, n_nodes: int) -> np.ndarray:
    """Dense cubic B-spline interpolation matrix ``(len(coords_mm), n_nodes)`` (float32)."""
    idx, w = bspline_taps(coords_mm, start_mm, step_mm, n_nodes)
    out = np.zeros((len(idx), n_nodes), np.float32)
    for k in range(4):
        np.add.at(out, (np.arange(len(idx)), idx[:, k]), w[:, k])
    return out


class SmoothField:
    """Random smooth scalar field: cubic B-spline over i.i.d. normal node values.

    The field has roughly ``amplitude`` standard deviation and correlation length ~``step_mm``;
    because B-spline weights are non-negative and sum to one, ``|field| <= max_abs`` everywhere.
    ``evaluate`` returns values on the tensor grid ``xs[i] x ys[j] x zs[k]`` of the given slices.
    """

    # std of a cubic B-spline sum of unit normals on a 3D grid (empirical, about 0.35)
    _STD = 0.35

    def __init__(self, rng: np.random.Generator, axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                 step_mm: float, amplitude: float):
        shape = []
        self.taps = []
        for ax in axes_mm:
            lo, hi = float(np.min(ax)), float(np.max(ax))
            n = int(np.ceil((hi - lo) / step_mm)) + 4
            start = lo - 1.5 * step_mm
            shape.append(n)
            self.taps.append(bspline_taps(ax, start, step_mm, n))
        self.weights = [bspline_weights(ax, lo_ - 1.5 * step_mm, step_mm, n_) for ax, lo_, n_ in
                        zip(axes_mm, [float(np.min(a)) for a in axes_mm], shape)][2:]  # z: dense
        self.values = (rng.standard_normal(shape) * (amplitude / self._STD)).astype(F32)
        self.max_abs = float(np.abs(self.values).max())

    def evaluate(self, si: slice, sj: slice, sk: slice) -> np.ndarray:
        """Field on the sub-grid ``(si, sj, sk)`` of the axes, shape ``(ni, nj, nk)``, float32."""
        (ix, wx), (iy, wy) = (t[si] for t in self.taps[0]), (t[sj] for t in self.taps[1])
        wz = self.weights[0][sk]
        a = self.values @ wz.T                       # (gx, gy, nk), small
        b = a[:, iy[:, 0], :] * wy[None, :, 0, None]  # (gx, nj, nk): 4-tap gather along y
        for k in range(1, 4):
            b += a[:, iy[:, k], :] * wy[None, :, k, None]
        c = b[ix[:, 0]] * wx[:, 0, None, None]        # (ni, nj, nk): 4-tap gather along x
        for k in range(1, 4):
            c += b[ix[:, k]] * wx[:, k, None, None]
        return c


def rotation(deg_x: float = 0.0, deg_y: float = 0.0, deg_z: float = 0.0) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` (degrees); columns are the local axes in the anatomical frame."""
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame_from_axis(direction: np.ndarray, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation whose local z axis is ``direction`` (normalised), rolled by ``roll_deg``."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    helper = np.array([1.0, 0, 0]) if abs(d[0]) < 0.9 else np.array([0, 1.0, 0])
    e1 = np.cross(helper, d)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    r = np.deg2rad(roll_deg)
    e1, e2 = np.cos(r) * e1 + np.sin(r) * e2, -np.sin(r) * e1 + np.cos(r) * e2
    return np.stack([e1, e2, d], axis=1)


@dataclass
class Ellipsoid:
    """Ellipsoid: ``center`` (mm), ``semi`` semi-axes (mm) along the columns of ``rot``."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def local(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, ...]:
        dx, dy, dz = X - F32(self.center[0]), Y - F32(self.center[1]), Z - F32(self.center[2])
        r = self.rot.astype(F32)
        return tuple(r[0, i] * dx + r[1, i] * dy + r[2, i] * dz for i in range(3))

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (exact on the surface, good near it)."""
        q = self.local(X, Y, Z)
        s = self.semi.astype(F32)
        k0 = np.sqrt((q[0] / s[0]) ** 2 + (q[1] / s[1]) ** 2 + (q[2] / s[2]) ** 2)
        k1 = np.sqrt((q[0] / s[0] ** 2) ** 2 + (q[1] / s[1] ** 2) ** 2 + (q[2] / s[2] ** 2) ** 2)
        return (k0 * (k0 - 1) / np.maximum(k1, F32(1e-6))).astype(F32)


def catmull_rom(points: np.ndarray, values: np.ndarray, step_mm: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth polyline through control ``points`` (n, 3), sampled every ~``step_mm``.

    ``values`` (n,) or (n, m) are interpolated linearly along the same parameter (e.g. radii).
    Returns ``(dense_points (N, 3), dense_values)``.
    """
    p = np.asarray(points, np.float64)
    v = np.asarray(values, np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out_p, out_v = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        t = np.linspace(0, 1, n, endpoint=False)[:, None]
        seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                     + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)
        out_p.append(seg)
        tt = t[:, 0] if v.ndim == 1 else t
        out_v.append(v[i] + (v[i + 1] - v[i]) * tt)
    out_p.append(p[-1:])
    out_v.append(v[-1:])
    return np.vstack(out_p), np.concatenate(out_v)


@dataclass
class Tube:
    """Tube around a polyline: ``points`` (n, 3) mm, ``radii`` (n,) mm; optional haustra-like
    radius modulation ``1 + wave_amp * cos(2 pi s / wave_mm)`` along the arc length ``s``."""

    points: np.ndarray
    radii: np.ndarray
    wave_amp: float = 0.0
    wave_mm: float = 30.0

    def __post_init__(self):
        self.points = np.asarray(self.points, np.float64)
        self.radii = np.asarray(self.radii, np.float64)
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        self.arc = np.concatenate([[0.0], np.cumsum(seg)])

    @classmethod
    def smooth(cls, points, radii, step_mm: float = 9.0, **kw) -> "Tube":
        p, r = catmull_rom(np.asarray(points, float), np.asarray(radii, float), step_mm)
        return cls(p, r, **kw)

    def rmax(self) -> float:
        return float(self.radii.max() * (1 + abs(self.wave_amp)))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.rmax()
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r

    def segments(self):
        """Yield ``(a, b, ra, rb, sa, sb, lo, hi)`` per segment with its bounding box."""
        amp = 1 + abs(self.wave_amp)
        for i in range(len(self.points) - 1):
            a, b = self.points[i], self.points[i + 1]
            r = max(self.radii[i], self.radii[i + 1]) * amp
            yield (a, b, self.radii[i], self.radii[i + 1], self.arc[i], self.arc[i + 1],
                   np.minimum(a, b) - r, np.maximum(a, b) + r)


def segment_sdf(X, Y, Z, a, b, ra, rb, sa=0.0, sb=1.0, wave_amp=0.0, wave_mm=30.0) -> np.ndarray:
    """Signed distance (mm, approx.) to a capsule from ``a`` to ``b`` with radius ``ra``->``rb``."""
    ab = (b - a).astype(F32)
    l2 = F32(max(float(ab @ ab), 1e-9))
    px, py, pz = X - F32(a[0]), Y - F32(a[1]), Z - F32(a[2])
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / l2, 0, 1)
    d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
    r = F32(ra) + t * F32(rb - ra)
    if wave_amp:
        s = F32(sa) + t * F32(sb - sa)
        r = r * (1 + F32(wave_amp) * np.cos(s * F32(2 * np.pi / wave_mm)))
    return (d - r).astype(F32)


def smooth_min(a: np.ndarray, b: np.ndarray, k_mm: float) -> np.ndarray:
    """Polynomial smooth minimum (union of two signed distances with a fillet of ~k_mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k_mm, 0, 1)
    return (b * (1 - h) + a * h - k_mm * h * (1 - h)).astype(F32)
