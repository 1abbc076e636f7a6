"""Random abdominal anatomy (13 FLARE organs, lesions, bones, bowel, vessels) and its rendering.

``sample_anatomy(rng)`` draws one patient: shapes in mm in the anatomical frame (x toward the
patient's right, y anterior, z superior; z = 0 near the renal hila / L1-L2), contrast phase and
tissue HU. ``render(anatomy, grid)`` paints HU and labels on a canonical (R, A, S) voxel grid
slab by slab, evaluating every shape at coordinates moved by a smooth random deformation field,
so only per-structure bounding boxes of one slab are ever held in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abdoseg.data.phantom.fields import (F32, Ellipsoid, SmoothField, Tube, frame_from_axis, rotation,
                                    segment_sdf, smooth_min)

LIVER, RKID, SPLEEN, PANCREAS, AORTA, IVC, RADR, LADR, GB, ESO, STOMACH, DUOD, LKID, LESION = range(1, 15)
KEEP = -1  # paint HU only, keep the current label

# Tissue HU ranges per contrast phase: name -> (low, high); one value is drawn per case.
PHASE_HU: dict[str, dict[str, tuple[float, float]]] = {
    "plain": dict(liver=(52, 66), spleen=(42, 52), kcortex=(28, 38), kmedulla=(24, 32), pancreas=(36, 48),
                  aorta=(35, 50), ivc=(35, 48), portal=(35, 48), hepv=(35, 48), adrenal=(20, 35),
                  wall=(35, 45), esophagus=(35, 45), heart=(35, 50), myocard=(40, 50), bladder=(2, 12),
                  gb=(0, 20), muscle=(40, 55), artery=(35, 50), vein=(35, 48)),
    "arterial": dict(liver=(62, 78), spleen=(85, 120), kcortex=(170, 220), kmedulla=(70, 100),
                     pancreas=(100, 130), aorta=(230, 340), ivc=(70, 100), portal=(110, 150), hepv=(55, 75),
                     adrenal=(50, 80), wall=(60, 90), esophagus=(40, 55), heart=(180, 300), myocard=(90, 120),
                     bladder=(2, 12), gb=(0, 20), muscle=(45, 60), artery=(230, 340), vein=(60, 90)),
    "venous": dict(liver=(95, 120), spleen=(105, 125), kcortex=(150, 190), kmedulla=(125, 155),
                   pancreas=(80, 105), aorta=(140, 190), ivc=(110, 150), portal=(150, 185), hepv=(140, 175),
                   adrenal=(55, 85), wall=(55, 80), esophagus=(40, 55), heart=(130, 170), myocard=(100, 120),
                   bladder=(2, 12), gb=(0, 20), muscle=(50, 65), artery=(140, 190), vein=(110, 150)),
}
PHASE_P = {"venous": 0.6, "arterial": 0.2, "plain": 0.2}
# Where lesions grow and their largest diameter (mm).
LESION_HOSTS: dict[str, tuple[float, float]] = {  # host -> (probability, max diameter mm)
    "liver": (0.42, 80.0), "right_kidney": (0.08, 50.0), "left_kidney": (0.08, 50.0),
    "pancreas": (0.14, 35.0), "stomach": (0.08, 40.0), "spleen": (0.05, 35.0), "node": (0.15, 30.0),
}


@dataclass
class Grid:
    """Canonical voxel grid: voxel centres ``xs, ys, zs`` (mm, anatomical frame, R/A/S increasing)."""

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.xs), len(self.ys), len(self.zs)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(a[1] - a[0]) if len(a) > 1 else 1.0 for a in (self.xs, self.ys, self.zs))


@dataclass
class Lesion:
    host: str
    center: np.ndarray
    radius_mm: float
    hu_delta: float  # relative to the host tissue
    necrotic: bool
    wave_dirs: np.ndarray  # (m, 3) random frequency vectors for the irregular border
    wave_amp: np.ndarray
    wave_phase: np.ndarray

    def sdf(self, X, Y, Z) -> np.ndarray:
        dx, dy, dz = X - F32(self.center[0]), Y - F32(self.center[1]), Z - F32(self.center[2])
        d = np.sqrt(dx * dx + dy * dy + dz * dz) + F32(1e-3)
        pert = np.zeros_like(d)
        for f, a, ph in zip(self.wave_dirs, self.wave_amp, self.wave_phase):
            pert += F32(a) * np.sin((dx * F32(f[0]) + dy * F32(f[1]) + dz * F32(f[2])) / d + F32(ph))
        return d - F32(self.radius_mm) * (1 + pert)

    def bbox(self):
        r = self.radius_mm * (1 + float(np.abs(self.wave_amp).sum()))
        return self.center - r, self.center + r


@dataclass
class Anatomy:
    """One random patient. ``hu`` holds the tissue HU drawn for this case; ``shapes`` the geometry."""

    phase: str
    hu: dict[str, float]
    shapes: dict[str, Any]
    body: dict[str, float]
    lesions: list[Lesion] = field(default_factory=list)
    deform_mm: float = 5.0
    oral_contrast: bool = False


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator, n_lesions: int) -> Anatomy:
    """Draw a random patient with ``n_lesions`` lesions (positions in mm, see module doc)."""
    phase = str(rng.choice(list(PHASE_P), p=list(PHASE_P.values())))
    hu = {k: _u(rng, *v) for k, v in PHASE_HU[phase].items()}
    hu.update(fat=_u(rng, -115, -85), vfat=_u(rng, -105, -75), lung=_u(rng, -880, -820),
              cortical=_u(rng, 650, 1000), cancellous=_u(rng, 170, 300), disc=_u(rng, 70, 110),
              csf=_u(rng, 10, 30), fluid=_u(rng, 0, 25), stool=_u(rng, -60, 40),
              oral=_u(rng, 200, 400), cartilage=_u(rng, 90, 140))
    a0, b0 = _u(rng, 138, 178), _u(rng, 98, 132)
    body = dict(a=a0, b=b0, n=_u(rng, 2.2, 2.8), fat=_u(rng, 8, 38), fat_ant=_u(rng, 1.0, 2.0),
                muscle=_u(rng, 8, 15), table_gap=_u(rng, 0, 25))
    sx, sy = a0 / 158.0, b0 / 115.0           # organ positions follow the body size
    size = _u(rng, 0.92, 1.08)               # overall organ size
    ys = -0.47 * b0                           # vertebral body centre (y)
    body["spine_y"] = ys
    sh: dict[str, Any] = {}

    def jit(p, s=5.0):
        return np.array([p[0] * sx, p[1] * sy, p[2]], float) + rng.normal(0, s, 3)

    def sz(semi, v=0.15):
        return np.array(semi, float) * size * rng.uniform(1 - v, 1 + v, 3)

    def rj(d=8.0):
        return rotation(*rng.normal(0, d, 3))

    z_r = _u(rng, 118, 142)
    z_l = z_r - _u(rng, 4, 18)
    sh["dome"] = dict(r=(60 * sx, 0.0, z_r), l=(-62 * sx, -5.0, z_l), curv=_u(rng, 95, 125))

    # liver: right lobe + left lobe, smooth union, clipped under the diaphragm
    sh["liver_r"] = Ellipsoid(jit((62, 4, 58)), sz((74, 88, 74), 0.12), rj(6))
    sh["liver_l"] = Ellipsoid(jit((-8, 42, 72), 6), sz((58, 36, 36)), rotation(0, 18, 10) @ rj(6))
    sh["gb"] = Ellipsoid(jit((50, 50, 12)), sz((16, 16, 38)) * np.array([1, 1, _u(rng, 0.7, 1.2)]),
                         frame_from_axis(np.array([0.15, 0.6, -0.8]) + rng.normal(0, 0.15, 3)))
    sh["spleen"] = Ellipsoid(jit((-92, -36, 62)), sz((22, 56, 48), 0.18), rotation(0, 10, -38) @ rj(6))
    sh["spleen_notch"] = Ellipsoid(sh["spleen"].center + sh["spleen"].rot @ np.array([20, 0, 0]) * 1.0
                                   + np.array([12 * sx, 10, 0]), np.array([14, 22, 24.0]), sh["spleen"].rot)
    for side, sgn in (("r", 1), ("l", -1)):
        zk = -8 if side == "r" else 6
        kid = Ellipsoid(jit((sgn * 70, ys / sy + 8, zk)), sz((28, 24, 58), 0.1),
                        rotation(-12, -sgn * 14, sgn * 32) @ rj(5))
        sh[f"kid_{side}"] = kid
        medial = kid.rot @ np.array([-sgn * 1.0, 0, 0])
        sh[f"sinus_{side}"] = Ellipsoid(kid.center + medial * kid.semi[0] * 1.0, kid.semi * [0.62, 0.5, 0.45], kid.rot)
        top = kid.center + kid.rot @ np.array([0, 0, kid.semi[2]])
        adr_c = np.array([top[0] - sgn * 6, top[1] - 2, top[2] + 12]) + rng.normal(0, 2, 3)
        limbs = []
        for k in range(2):
            d = np.array([sgn * (0.25 if k == 0 else -0.35), 0.55 if k == 0 else -0.25, -1.0])
            limbs.append(Ellipsoid(adr_c + np.array([0, 0, -6]) + d / np.linalg.norm(d) * 8,
                                   np.array([_u(rng, 3.0, 4.2), _u(rng, 7, 10), _u(rng, 13, 19)]) * size,
                                   frame_from_axis(d, _u(rng, -20, 20))))
        sh[f"adr_{side}"] = limbs
    # retroperitoneal vessels
    z_bif = _u(rng, -120, -85)
    ao_r = 12.0 * size * _u(rng, 0.85, 1.2)
    sh["aorta"] = Tube.smooth([jit((-26, ys / sy + 12, 320), 3), jit((-20, ys / sy + 18, 150), 3),
                               jit((-12, ys / sy + 30, 40), 3), jit((-8, ys / sy + 32, z_bif + 10), 3)],
                              [ao_r * 1.1, ao_r, ao_r * 0.95, ao_r * 0.8])
    bif = sh["aorta"].points[-1]
    sh["iliac_a"] = [Tube.smooth([bif, bif + [sgn * 40 * sx, 8, -70], bif + [sgn * 70 * sx, 45, -150]],
                                 [ao_r * 0.55, ao_r * 0.5, ao_r * 0.45]) for sgn in (1, -1)]
    ivc_r = 10.5 * size * _u(rng, 0.85, 1.15)
    sh["ivc"] = Tube.smooth([jit((20, ys / sy + 24, z_bif - 5), 3), jit((22, ys / sy + 28, -10), 3),
                             jit((24, ys / sy + 36, 60), 3), jit((20, ys / sy + 44, z_r - 18), 3),
                             jit((14, ys / sy + 55, z_r + 8), 3)],
                            [ivc_r * 0.9, ivc_r, ivc_r * 1.1, ivc_r * 1.15, ivc_r * 1.3])
    conf = sh["ivc"].points[0]
    sh["iliac_v"] = [Tube.smooth([conf, conf + [sgn * 38 * sx, 0, -70], conf + [sgn * 62 * sx, 35, -150]],
                                 [ivc_r * 0.7, ivc_r * 0.65, ivc_r * 0.6]) for sgn in (1, -1)]
    eso_p = [jit((4, ys / sy + 48, 320), 3), jit((-2, ys / sy + 50, z_r + 30), 3),
             jit((-18, ys / sy + 62, z_l - 8), 3), jit((-30, 4, z_l - 22), 3)]
    sh["esophagus"] = Tube.smooth(eso_p, [8.5 * size] * 4)
    sh["esophagus_air"] = rng.random() < 0.5
    # stomach along a curved tube; radius ~ distension
    dist = _u(rng, 0.7, 1.25)
    st_p = [eso_p[-1], jit((-56, -8, 90)), jit((-66, 16, 60)), jit((-52, 40, 28)), jit((-18, 50, 8)),
            jit((12, 38, 8))]
    st_r = np.array([10, 34, 36, 30, 20, 11]) * size * np.array([1, dist, dist, dist, (1 + dist) / 2, 1])
    sh["stomach"] = Tube.smooth(st_p, st_r)
    sh["stomach_fill"] = _u(rng, 0.2, 0.9)   # fraction of the lumen height holding fluid
    # pancreas head in the duodenal C-loop, tail toward the splenic hilum
    pa_p = [jit((30, 6, -16), 3), jit((10, 18, -2), 3), jit((-28, 12, 12), 3), jit((-58, 0, 24), 3),
            jit((-80, -18, 34), 3)]
    sh["pancreas"] = Tube.smooth(pa_p, np.array([15, 11, 10.5, 9.5, 8]) * size * rng.uniform(0.85, 1.15))
    sh["uncinate"] = Ellipsoid(pa_p[0] + np.array([-8, -10, -12]), sz((13, 10, 12)), rj(10))
    du_p = [st_p[-1], jit((38, 24, 6), 3), jit((52, 6, -4), 3), jit((58, 4, -28), 3), jit((50, 6, -50), 3),
            jit((20, 2, -58), 3), jit((-12, 4, -56), 3), jit((-30, 8, -42), 3), jit((-34, 14, -24), 3)]
    du_p[2][0] = max(du_p[2][0], pa_p[0][0] + 22)
    du_p[3][0] = max(du_p[3][0], pa_p[0][0] + 26)
    sh["duodenum"] = Tube.smooth(du_p, np.array([11, 12, 12, 12, 12, 11, 11, 11, 10]) * size)
    # mesenteric / portal vessels (unlabelled, HU only inside the liver)
    confl = pa_p[1] + np.array([2, -13, -2])
    hil = sh["liver_r"].center + np.array([-30 * sx, 0, -10])
    sh["portal"] = [Tube.smooth([confl, hil, hil + [42 * sx, -6, 16]], [7, 6.5, 4.5]),
                    Tube.smooth([hil, hil + [-30, 26, 20], hil + [-55, 30, 22]], [5.5, 4.5, 3.5])]
    sh["splenic_v"] = Tube.smooth([confl, pa_p[2] + [0, -12, 0], pa_p[3] + [0, -11, 0], pa_p[4] + [-6, -8, 6]],
                                  [5, 4.5, 4.5, 4])
    sh["smv"] = Tube.smooth([confl, confl + [4, 8, -40], confl + [0, 20, -90]], [5.5, 5, 4])
    ao = sh["aorta"]
    i_sma = int(np.argmin(np.abs(ao.points[:, 2] - (pa_p[1][2] + 8))))
    sma0 = ao.points[i_sma]
    sh["sma"] = Tube.smooth([sma0, sma0 + [0, 22, -14], sma0 + [2, 40, -90]], [4, 3.5, 3])
    ivc_top = sh["ivc"].points[int(len(sh["ivc"].points) * 0.75)]
    sh["hepv"] = [Tube.smooth([ivc_top, ivc_top + d], [5.5, 2.5]) for d in
                  ([60 * sx, -5, -15], [15, 45, -10], [-35, 50, -5])]
    sh["renal_v"] = []
    for side in ("r", "l"):
        hil_k = sh[f"sinus_{side}"].center
        tgt = sh["ivc"].points[int(np.argmin(np.abs(sh["ivc"].points[:, 2] - hil_k[2])))]
        mid = (hil_k + tgt) / 2 + (np.array([0, 14, 0]) if side == "l" else 0)
        sh["renal_v"].append(Tube.smooth([hil_k, mid, tgt], [4.5, 5, 5]))
    # adrenals stay clear of the IVC (right, behind it) and the aorta (left, lateral to it)
    for side, sgn in (("r", 1), ("l", -1)):
        vessel = sh["ivc"] if side == "r" else sh["aorta"]
        for limb in sh[f"adr_{side}"]:
            vp = vessel.points[int(np.argmin(np.abs(vessel.points[:, 2] - limb.center[2])))]
            vr = vessel.radii.max()
            if side == "r":
                limb.center[1] = min(limb.center[1], vp[1] - vr - 6)
                limb.center[0] = max(limb.center[0], vp[0] - 4)
            else:
                limb.center[0] = min(limb.center[0], vp[0] - vr - 7)
    # colon (haustra) and pelvis
    colon = [(86, 22, -115), (96, 6, -70), (94, 6, -20), (80, 22, 10), (40, 62, 8), (0, 76, -2),
             (-45, 62, 18), (-84, 18, 48), (-98, -6, 20), (-96, -6, -60), (-90, 0, -125), (-55, 35, -155),
             (-12, 32, -172), (6, ys / sy + 22, -200), (0, ys / sy + 14, -250), (0, ys / sy + 14, -320)]
    cr = np.array([30, 26, 25, 24, 23, 22, 22, 23, 22, 21, 20, 18, 18, 20, 20, 16]) * size * _u(rng, 0.8, 1.15)
    sh["colon"] = Tube.smooth([jit(p, 6) for p in colon], cr, wave_amp=_u(rng, 0.08, 0.16),
                              wave_mm=_u(rng, 22, 34))
    sh["bladder"] = Ellipsoid(jit((0, 48, -238)), sz((46, 36, 34), 0.25), rj(5))
    sh["heart"] = Ellipsoid(jit((-18, 30, z_r + 52)), sz((66, 52, 58), 0.1), rotation(0, 0, 25) @ rj(5))
    sh["psoas"] = [Tube.smooth([(sgn * 24 * sx, ys + 6, 40), (sgn * 36 * sx, ys + 4, -30),
                                (sgn * 52 * sx, ys + 10, -120), (sgn * 70 * sx, ys + 40, -200)],
                               np.array([5, 14, 22, 22]) * size) for sgn in (1, -1)]
    sh["vertebra"] = dict(period=_u(rng, 30, 36), phase=_u(rng, 0, 36), disc=_u(rng, 5, 8),
                          rx=20.0 * size, ry=16.5 * size)
    sh["rib_z12"] = _u(rng, 18, 38)
    sh["rib_step"] = _u(rng, 24, 30)
    lesions = [_sample_lesion(rng, sh) for _ in range(n_lesions)]
    return Anatomy(phase=phase, hu=hu, shapes=sh, body=body, lesions=lesions, deform_mm=_u(rng, 3, 6),
                   oral_contrast=bool(rng.random() < 0.15))


def _sample_lesion(rng: np.random.Generator, sh: dict) -> Lesion:
    names = list(LESION_HOSTS)
    p = np.array([v[0] for v in LESION_HOSTS.values()])
    host = str(rng.choice(names, p=p / p.sum()))
    dmax = LESION_HOSTS[host][1]
    diam = float(np.exp(rng.uniform(np.log(5.0), np.log(dmax))))
    if host in ("liver", "spleen", "right_kidney", "left_kidney"):
        ell = {"liver": sh["liver_r"], "spleen": sh["spleen"], "right_kidney": sh["kid_r"],
               "left_kidney": sh["kid_l"]}[host]
        u = rng.normal(size=3)
        u = u / np.linalg.norm(u) * rng.uniform(0, 1) ** (1 / 3)
        frac = 0.55 if host == "liver" else 0.6
        center = ell.center + ell.rot @ (u * ell.semi * frac)
    else:
        tube = {"pancreas": sh["pancreas"], "stomach": sh["stomach"], "node": sh["aorta"]}[host]
        if host == "node":   # para-aortic / mesenteric lymph node
            pts = tube.points[(tube.points[:, 2] < 40) & (tube.points[:, 2] > -90)]
            c = pts[rng.integers(len(pts))]
            ang = rng.uniform(0, 2 * np.pi)
            center = c + (tube.radii.max() + diam / 2 + 2) * np.array([np.cos(ang), abs(np.sin(ang)), 0])
        else:
            n = len(tube.points)
            i = int(rng.integers(n // 5, n - 2))
            center = tube.points[i] + rng.normal(0, tube.radii[i] * 0.3, 3)
    m = 4
    dirs = rng.normal(size=(m, 3)) * rng.uniform(1.0, 3.0, (m, 1))
    hyper = rng.random() < 0.3
    delta = _u(rng, 25, 70) if hyper else -_u(rng, 30, 80)
    return Lesion(host, center, diam / 2, delta, bool(diam > 30 and rng.random() < 0.5), dirs,
                  rng.uniform(0.02, 0.08, m) * (1.5 if diam > 20 else 1.0), rng.uniform(0, 2 * np.pi, m))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

class Slab:
    """One z-slab of the canonical grid with deformed anatomical coordinates ``X, Y, Z``."""

    def __init__(self, grid: Grid, k0: int, k1: int, deform: list[SmoothField], dmax: float,
                 hu: np.ndarray, lab: np.ndarray, fields: dict[str, SmoothField]):
        self.grid, self.k0, self.k1, self.dmax, self.fields = grid, k0, k1, dmax, fields
        all_ = (slice(None), slice(None), slice(k0, k1))
        self.X = grid.xs[:, None, None] + deform[0].evaluate(*all_)
        self.Y = grid.ys[None, :, None] + deform[1].evaluate(*all_)
        self.Z = grid.zs[None, None, k0:k1] + deform[2].evaluate(*all_)
        # tight bound of the displacement inside this slab (boxes are padded by it)
        self.dmax = float(max(np.abs(self.X - grid.xs[:, None, None]).max(),
                              np.abs(self.Y - grid.ys[None, :, None]).max(),
                              np.abs(self.Z - grid.zs[None, None, k0:k1]).max()))
        self.zs = grid.zs[k0:k1]
        self.hu = hu[:, :, k0:k1]
        self.lab = lab[:, :, k0:k1]
        self._cache: dict[str, np.ndarray] = {}

    def box(self, lo, hi, pad: float = 0.0):
        """Local slices covering anatomical box ``[lo, hi]`` (mm) after deformation; None if empty."""
        m = self.dmax + pad + 1.0
        g = self.grid
        i0, i1 = np.searchsorted(g.xs, lo[0] - m), np.searchsorted(g.xs, hi[0] + m, side="right")
        j0, j1 = np.searchsorted(g.ys, lo[1] - m), np.searchsorted(g.ys, hi[1] + m, side="right")
        k0, k1 = np.searchsorted(self.zs, lo[2] - m), np.searchsorted(self.zs, hi[2] + m, side="right")
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            return None
        return slice(int(i0), int(i1)), slice(int(j0), int(j1)), slice(int(k0), int(k1))

    def xyz(self, sl):
        return self.X[sl], self.Y[sl], self.Z[sl]

    def field(self, name: str, sl) -> np.ndarray:
        """Smooth random field ``name`` on the local box ``sl`` (whole slab cached)."""
        if name in self._cache:
            return self._cache[name][sl]
        si, sj, sk = sl
        if si == slice(None) and sj == slice(None):
            self._cache[name] = self.fields[name].evaluate(slice(None), slice(None), slice(self.k0, self.k1))
            return self._cache[name][sl]
        k0 = self.k0 + (sk.start or 0)
        k1 = self.k0 + (sk.stop if sk.stop is not None else self.k1 - self.k0)
        return self.fields[name].evaluate(si, sj, slice(k0, k1))

    def paint(self, sl, mask: np.ndarray, value, label: int = KEEP) -> None:
        np.copyto(self.hu[sl], value, where=mask, casting="unsafe")
        if label != KEEP:
            np.copyto(self.lab[sl], label, where=mask, casting="unsafe")

    def tube_sdf(self, tube: Tube, sl) -> np.ndarray:
        """Signed distance of ``tube`` on local box ``sl`` (large outside its segments)."""
        shape = tuple(s.stop - s.start for s in sl)
        out = np.full(shape, 1e4, F32)
        for a, b, ra, rb, sa, sb, lo, hi in tube.segments():
            s2 = self.box(lo, hi)
            if s2 is None:
                continue
            inter = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(sl, s2))
            if any(s.stop <= s.start for s in inter):
                continue
            X, Y, Z = self.xyz(inter)
            d = segment_sdf(X, Y, Z, a, b, ra, rb, sa, sb, tube.wave_amp, tube.wave_mm)
            rel = tuple(slice(s.start - p.start, s.stop - p.start) for s, p in zip(inter, sl))
            np.minimum(out[rel], d, out=out[rel])
        return out


def _body_sdf(X, Y, Z, body: dict) -> np.ndarray:
    """Ray distance (mm, negative inside) to the body outline, a z-dependent superellipse."""
    pel = 1 / (1 + np.exp((Z + 170) / 30))
    chest = 1 / (1 + np.exp(-(Z - 140) / 30))
    a = F32(body["a"]) * (1 + F32(0.08) * pel - F32(0.04) * chest)
    b = F32(body["b"]) * (1 - F32(0.06) * pel + F32(0.06) * chest)
    n = F32(body["n"])
    yy = np.where(Y < 0, Y * F32(1.04), Y)  # slightly flatter back (lying on the table)
    rho = ((np.abs(X) / a) ** n + (np.abs(yy) / b) ** n) ** (1 / n)
    r = np.sqrt(X * X + yy * yy)
    return (r * (1 - 1 / np.maximum(rho, F32(1e-3)))).astype(F32)


def _diaphragm_z(X, Y, dome: dict) -> np.ndarray:
    """Height (mm) of the diaphragm surface above (x, y): max of two paraboloid domes."""
    out = None
    for key in ("r", "l"):
        cx, cy, cz = dome[key]
        h = F32(cz) - ((X - F32(cx)) ** 2 + (Y - F32(cy)) ** 2 * F32(1.3)) / F32(2 * dome["curv"])
        out = h if out is None else np.maximum(out, h)
    return out


def _ell_union_sdf(items: list[Ellipsoid], X, Y, Z) -> np.ndarray:
    out = None
    for e in items:
        d = e.sdf(X, Y, Z)
        out = d if out is None else np.minimum(out, d)
    return out


def _bbox_union(items) -> tuple[np.ndarray, np.ndarray]:
    boxes = [it.bbox() for it in items]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def render(an: Anatomy, grid: Grid, rng: np.random.Generator, max_voxels_per_slab: int = 3_000_000,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint ``an`` on ``grid``.

    Returns ``(hu float32, organ_label uint8, label uint8, body bool)``, all of shape
    ``grid.shape`` in canonical (R, A, S) order. ``organ_label`` has organs 1..13 only;
    ``label`` additionally carries lesions (14) over the organs. HU are noise-free and unblurred.
    """
    axes = (grid.xs, grid.ys, grid.zs)
    deform = [SmoothField(rng, axes, 45.0, an.deform_mm) for _ in range(3)]
    dmax = max(d.max_abs for d in deform)
    fields = {"tex": SmoothField(rng, axes, 7.0, 1.0), "bowel": SmoothField(rng, axes, 9.0, 1.0),
              "gas": SmoothField(rng, axes, 16.0, 1.0), "lob": SmoothField(rng, axes, 4.0, 1.0)}
    hu = np.full(grid.shape, -1000.0, F32)
    lab = np.zeros(grid.shape, np.uint8)
    body_mask = np.zeros(grid.shape, bool)
    nxy = grid.shape[0] * grid.shape[1]
    step = max(1, max_voxels_per_slab // nxy)
    organ_lab = np.zeros(grid.shape, np.uint8)
    for k0 in range(0, grid.shape[2], step):
        k1 = min(grid.shape[2], k0 + step)
        s = Slab(grid, k0, k1, deform, dmax, hu, lab, fields)
        _paint_slab(an, s, body_mask[:, :, k0:k1])
        organ_lab[:, :, k0:k1] = s.lab
        _paint_lesions(an, s)
    return hu, organ_lab, lab, body_mask


def _paint_slab(an: Anatomy, s: Slab, body_mask: np.ndarray) -> None:
    H, sh, bd = an.hu, an.shapes, an.body
    whole = (slice(None), slice(None), slice(None))
    X, Y, Z = s.xyz(whole)
    # --- table and body wall ---------------------------------------------------------------
    ytab = -bd["b"] * 1.05 - bd["table_gap"]
    tb = s.box((-260, ytab - 14, -1e4), (260, ytab, 1e4))
    if tb is not None:
        Xt, Yt, _ = s.xyz(tb)
        yc = F32(ytab) + F32(0.0004) * Xt ** 2
        m = (Yt < yc) & (Yt > yc - 12) & (np.abs(Xt) < 230)
        s.paint(tb, m, F32(-300) + F32(550) * ((Yt > yc - 2) | (Yt < yc - 10)), 0)
    bsdf = _body_sdf(X, Y, Z, bd)
    body = bsdf < 0
    body_mask |= body
    s.paint(whole, body, H["fat"] + 6 * s.field("tex", whole), 0)
    fat = F32(bd["fat"]) * (1 + F32(bd["fat_ant"] - 1) * np.clip(Y / F32(bd["b"]), 0, 1))
    fat = fat * (1 + F32(0.25) * s.field("gas", whole))
    wall_in = bsdf < -fat
    s.paint(whole, wall_in, H["muscle"] + 5 * s.field("tex", whole), 0)
    cav_sdf = bsdf + fat + F32(bd["muscle"])
    cavity = cav_sdf < 0
    s.paint(whole, cavity, H["vfat"] + 8 * s.field("tex", whole), 0)
    # --- thorax: lungs above the diaphragm, heart ---------------------------------------------
    dome_top = max(sh["dome"]["r"][2], sh["dome"]["l"][2])
    th = s.box((-400, -400, dome_top - 130), (400, 400, 1e4))
    if th is not None:
        Xs, Ys, Zs = s.xyz(th)
        hz = _diaphragm_z(Xs, Ys, sh["dome"])
        above = cavity[th] & (Zs > hz + 5)
        media = (np.abs(Xs + 8) < 32) & (Ys > F32(bd["spine_y"] - 8))
        lung = above & ~media
        s.paint(th, lung, H["lung"] + 25 * s.field("tex", th) + 60 * (s.field("lob", th) > 2.2), 0)
        dia = cavity[th] & (Zs > hz) & (Zs <= hz + 5)
        s.paint(th, dia, H["muscle"], 0)
    hb = sh["heart"].bbox()
    hsl = s.box(*hb)
    if hsl is not None:
        Xh, Yh, Zh = s.xyz(hsl)
        d = sh["heart"].sdf(Xh, Yh, Zh)
        m = (d < 0) & (Zh > _diaphragm_z(Xh, Yh, sh["dome"]) + 5) & cavity[hsl]
        s.paint(hsl, m & (d > -9), H["myocard"], 0)
        s.paint(hsl, m & (d <= -9), H["heart"], 0)
        s.paint(hsl, (d >= 0) & (d < 4) & cavity[hsl] & (Zh > _diaphragm_z(Xh, Yh, sh["dome"]) + 5), H["vfat"], 0)
    # --- bowel: small-bowel loops from a smooth random field, colon tube ------------------------
    bz = s.box((-200, sh["vertebra"]["ry"] * 0 + bd["spine_y"] - 40, -1e4), (200, 250, 60))
    if bz is not None:
        Xb, Yb, Zb = s.xyz(bz)
        top = F32(18) + F32(30) * np.clip(-Xb / 80, 0, 1) * (Yb > 0)
        zone = cavity[bz] & (cav_sdf[bz] < -4) & (Zb < top) & ((Yb > F32(bd["spine_y"] + 30)) | (np.abs(Xb) > 75))
        if Zb.size and (Zb < 0).any():
            zone &= ~((Zb < -175) & (Yb < F32(bd["spine_y"] + 30)))
        f = s.field("bowel", bz)
        g = s.field("gas", bz)
        loop = zone & (f > 0.0)
        lumen = zone & (f > 0.45)
        s.paint(bz, loop, H["wall"] + 8 * s.field("tex", bz), 0)
        content = F32(H["oral"] if an.oral_contrast else H["fluid"]) + 10 * s.field("tex", bz)
        s.paint(bz, lumen, content, 0)
        s.paint(bz, lumen & (g > 1.0) & (f > 0.6), F32(-1000), 0)
    _paint_colon(an, s)
    # --- muscles of the back and pelvis ----------------------------------------------------
    for ps in sh["psoas"]:
        _paint_tube(s, ps, H["muscle"] + 4, 0, tex=5)
    # --- organs (later ones win where shapes touch) -------------------------------------------
    _paint_liver(an, s)
    _paint_simple_ell(s, sh["gb"], H["gb"], GB, wall=(2.0, H["wall"]))
    _paint_kidneys(an, s)
    for side, lbl in (("r", RADR), ("l", LADR)):
        items = sh[f"adr_{side}"]
        sl = s.box(*_bbox_union(items))
        if sl is not None:
            d = _ell_union_sdf(items, *s.xyz(sl))
            s.paint(sl, d < 0, H["adrenal"] + 6 * s.field("tex", sl), lbl)
    _paint_pancreas(an, s)
    _paint_esophagus(an, s)
    _paint_stomach(an, s)
    _paint_spleen(an, s)
    _paint_duodenum(an, s)
    # --- vessels ---------------------------------------------------------------------------
    for t in sh["portal"]:
        _paint_vessel(s, t, H["portal"], keep=(LIVER,))
    for t in sh["hepv"]:
        _paint_vessel(s, t, H["hepv"], keep=(LIVER,))
    _paint_vessel(s, sh["splenic_v"], H["portal"], keep=(SPLEEN,))
    _paint_vessel(s, sh["smv"], H["portal"])
    for t in sh["renal_v"]:
        _paint_vessel(s, t, H["vein"], keep=(RKID, LKID))
    _paint_tube(s, sh["ivc"], H["ivc"], IVC, tex=4)
    for t in sh["iliac_v"]:
        _paint_vessel(s, t, H["vein"])
    _paint_tube(s, sh["aorta"], H["aorta"], AORTA, tex=4)
    for t in sh["iliac_a"]:
        _paint_vessel(s, t, H["artery"])
    _paint_vessel(s, sh["sma"], H["artery"])
    _paint_simple_ell(s, sh["bladder"], H["bladder"], 0, wall=(3.0, H["wall"]))
    # --- bones last --------------------------------------------------------------------------
    _paint_spine(an, s, body)
    _paint_ribs(an, s, cav_sdf)
    _paint_pelvis(an, s)
    # clip everything to the body (organs may poke through the superellipse)
    outside = ~body
    s.lab[outside] = 0


def _paint_tube(s: Slab, tube: Tube, hu: float, label: int, tex: float = 0.0):
    sl = s.box(*tube.bbox())
    if sl is None:
        return None
    d = s.tube_sdf(tube, sl)
    m = d < 0
    val = hu + tex * s.field("tex", sl) if tex else hu
    s.paint(sl, m, val, label)
    return sl, d


def _paint_vessel(s: Slab, tube: Tube, hu: float, keep: tuple[int, ...] = ()):
    """Unlabelled vessel; inside organs listed in ``keep`` only the HU changes (organ label stays)."""
    sl = s.box(*tube.bbox())
    if sl is None:
        return
    d = s.tube_sdf(tube, sl)
    m = d < 0
    if not m.any():
        return
    inside_keep = np.isin(s.lab[sl], keep) if keep else np.zeros_like(m)
    s.paint(sl, m & inside_keep, hu)
    s.paint(sl, m & ~inside_keep, hu, 0)


def _paint_simple_ell(s: Slab, e: Ellipsoid, hu: float, label: int, wall=None):
    sl = s.box(*e.bbox())
    if sl is None:
        return
    d = e.sdf(*s.xyz(sl))
    s.paint(sl, d < 0, hu + 3 * s.field("tex", sl), label)
    if wall is not None:
        s.paint(sl, (d < 0) & (d > -wall[0]), wall[1])


def _paint_liver(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    lo, hi = _bbox_union([sh["liver_r"], sh["liver_l"]])
    sl = s.box(lo, hi)
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    d = smooth_min(sh["liver_r"].sdf(X, Y, Z), sh["liver_l"].sdf(X, Y, Z), 18.0)
    d = np.maximum(d, Z - _diaphragm_z(X, Y, sh["dome"]))
    m = d < 0
    s.paint(sl, m, H["liver"] + 5 * s.field("tex", sl), LIVER)


def _paint_spleen(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    sl = s.box(*sh["spleen"].bbox())
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    d = np.maximum(sh["spleen"].sdf(X, Y, Z), -sh["spleen_notch"].sdf(X, Y, Z))
    d = np.maximum(d, Z - _diaphragm_z(X, Y, sh["dome"]))
    hu = H["spleen"] + 5 * s.field("tex", sl)
    if an.phase == "arterial":  # heterogeneous "zebra" enhancement
        hu = hu + 25 * np.sin(s.field("bowel", sl) * 3)
    s.paint(sl, d < 0, hu, SPLEEN)


def _paint_kidneys(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    for side, lbl in (("r", RKID), ("l", LKID)):
        kid, sinus = sh[f"kid_{side}"], sh[f"sinus_{side}"]
        sl = s.box(*kid.bbox())
        if sl is None:
            continue
        X, Y, Z = s.xyz(sl)
        dk = kid.sdf(X, Y, Z)
        ds = sinus.sdf(X, Y, Z)
        kidney = (dk < 0) & (ds > 0)
        cortex = kidney & ((dk > -6) | (ds < 5))
        pyramids = np.sin(s.field("lob", sl) * 2.5) > 0.3
        hu = np.where(cortex | ~pyramids, F32(H["kcortex"]), F32(H["kmedulla"])) + 4 * s.field("tex", sl)
        s.paint(sl, kidney, hu, lbl)
        s.paint(sl, (dk < 0) & (ds <= 0), H["vfat"] + 10 * s.field("tex", sl), 0)
        pelvis = (ds < -sinus.semi.min() * 0.45) & (dk < 0)
        s.paint(sl, pelvis, H["fluid"], 0)


def _paint_pancreas(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    lo, hi = _bbox_union([sh["pancreas"], sh["uncinate"]])
    sl = s.box(lo, hi)
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    d = np.minimum(s.tube_sdf(sh["pancreas"], sl), sh["uncinate"].sdf(X, Y, Z))
    lob = s.field("lob", sl)
    m = d < 0
    s.paint(sl, m, H["pancreas"] + 6 * s.field("tex", sl), PANCREAS)
    s.paint(sl, m & (lob > 1.6), H["vfat"] * 0.6, PANCREAS)  # fatty clefts between lobules


def _paint_esophagus(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    r = _paint_tube(s, sh["esophagus"], H["esophagus"], ESO, tex=3)
    if r is not None and sh["esophagus_air"]:
        sl, d = r
        s.paint(sl, d < -6, F32(-900))


def _paint_stomach(an: Anatomy, s: Slab):
    sh = an.shapes
    sl = s.box(*sh["stomach"].bbox())
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    d = s.tube_sdf(sh["stomach"], sl)
    d = np.maximum(d, Z - _diaphragm_z(X, Y, sh["dome"]))
    # gas level in world y: computed on the whole stomach so every slab agrees
    _paint_hollow_level(s, sl, d, an, STOMACH, sh["stomach"], sh["stomach_fill"], 5.0)


def _paint_hollow_level(s, sl, d, an, label, tube: Tube, fill: float, wall_mm: float):
    H = an.hu
    m = d < 0
    if not m.any():
        return
    s.paint(sl, m, H["wall"] + 6 * s.field("tex", sl), label)
    lumen = d < -wall_mm
    Y = s.Y[sl]
    ylo = float((tube.points[:, 1] - tube.radii).min())
    yhi = float((tube.points[:, 1] + tube.radii).max())
    level = F32(ylo + fill * (yhi - ylo))
    content = F32(H["oral"] if an.oral_contrast else H["fluid"]) + 6 * s.field("tex", sl)
    s.paint(sl, lumen, content)
    s.paint(sl, lumen & (Y > level), F32(-1000) + 15 * s.field("tex", sl))


def _paint_duodenum(an: Anatomy, s: Slab):
    sh = an.shapes
    sl = s.box(*sh["duodenum"].bbox())
    if sl is None:
        return
    d = s.tube_sdf(sh["duodenum"], sl)
    _paint_hollow_level(s, sl, d, an, DUOD, sh["duodenum"], 0.75, 2.5)


def _paint_colon(an: Anatomy, s: Slab):
    sh, H = an.shapes, an.hu
    sl = s.box(*sh["colon"].bbox())
    if sl is None:
        return
    d = s.tube_sdf(sh["colon"], sl)
    m = d < 0
    if not m.any():
        return
    s.paint(sl, m, H["wall"], 0)
    lumen = d < -2.5
    g = s.field("gas", sl)
    b = s.field("lob", sl)
    stool = F32(H["stool"]) + F32(60) * b + F32(40) * s.field("tex", sl)
    s.paint(sl, lumen, stool)
    s.paint(sl, lumen & ((g > 0.2) | (b > 1.3)), F32(-1000))


def _paint_spine(an: Anatomy, s: Slab, body: np.ndarray):
    H, v, bd = an.hu, an.shapes["vertebra"], an.body
    ys = bd["spine_y"]
    sl = s.box((-70, ys - 75, -1e4), (70, ys + 25, 1e4))
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    ph = np.mod(Z - F32(v["phase"]), F32(v["period"]))
    disc = ph < F32(v["disc"])
    # slight lordosis: the spine moves anteriorly in the lumbar region
    yc = F32(ys) + F32(8) * np.exp(-((Z + 60) / 70) ** 2)
    rb = np.sqrt((X / F32(v["rx"])) ** 2 + ((Y - yc) / F32(v["ry"])) ** 2)
    vb = rb < 1
    shell = rb > 1 - 2.0 / v["rx"]
    s.paint(sl, vb, np.where(disc, F32(H["disc"]), np.where(shell, F32(H["cortical"]), F32(H["cancellous"])))
            + 15 * s.field("tex", sl), 0)
    cy = yc - F32(v["ry"]) - 11
    rc = np.sqrt(X ** 2 + (Y - cy) ** 2)
    post = (ph > v["disc"] + 3) & (ph < 0.8 * v["period"])
    ring = (rc > 9) & (rc < 16) & (Y < yc - F32(v["ry"]) + 2) & post
    spinous = (np.abs(X) < 4) & (Y < cy - 10) & (Y > cy - 42) & post
    transverse = (np.abs(X) > 12) & (np.abs(X) < 44) & (np.abs(Y - cy - 6) < 5) & (ph > v["disc"] + 8) & (ph < 0.55 * v["period"])
    bone = ring | spinous | transverse
    s.paint(sl, bone, F32(H["cortical"] * 0.7) + 20 * s.field("tex", sl), 0)
    s.paint(sl, rc <= 9, H["csf"], 0)
    # paraspinal muscles
    for sgn in (1, -1):
        m = (((X - sgn * 30) / 26) ** 2 + ((Y - cy + 18) / 22) ** 2 < 1) & ~bone & (rc > 9) & body[sl]
        s.paint(sl, m, H["muscle"] + 5 * s.field("tex", sl), 0)


def _paint_ribs(an: Anatomy, s: Slab, cav_sdf: np.ndarray):
    H, bd, sh = an.hu, an.body, an.shapes
    zlo = sh["rib_z12"] - 160
    sl = s.box((-400, -400, zlo), (400, 400, 1e4))
    if sl is None:
        return
    r_off = cav_sdf[sl] + F32(5)            # rib line ~5 mm outside the cavity
    idx = np.nonzero(np.abs(r_off) < 6)      # only the thin shell where ribs can be
    if not idx[0].size:
        return
    X, Y, Z = (A[sl][idx] for A in (s.X, s.Y, s.Z))
    r = r_off[idx]
    theta = np.arctan2(np.abs(X) / F32(bd["a"]), -Y / F32(bd["b"])) / F32(np.pi)  # 0 posterior, 1 anterior
    hu = s.hu[sl][idx]
    lab = s.lab[sl][idx]
    for k in range(12):
        z0 = sh["rib_z12"] + k * sh["rib_step"]
        t_end = [0.38, 0.55, 0.72, 0.8, 0.85][min(k, 4)]
        drop = [60, 90, 120, 140, 150][min(k, 4)]
        zc = F32(z0) - F32(drop) * theta
        d = np.sqrt((r / F32(1.25)) ** 2 + (Z - zc) ** 2)
        rib = (theta > 0.1) & (theta < t_end) & (d < 4.5)
        cart = (theta >= t_end) & (theta < 0.93) & (d < 4.5) & (k >= 2)
        hu[cart] = H["cartilage"]
        hu[rib] = np.where(d[rib] > 2.8, F32(H["cortical"]), F32(H["cancellous"]))
        lab[rib | cart] = 0
    s.hu[sl][idx] = hu
    s.lab[sl][idx] = lab


def _paint_pelvis(an: Anatomy, s: Slab):
    H, bd = an.hu, an.body
    ys = bd["spine_y"]
    sl = s.box((-250, -250, -1e4), (250, 250, -100))
    if sl is None:
        return
    X, Y, Z = s.xyz(sl)
    bone = np.zeros(X.shape, bool)
    ax = np.abs(X)
    sx = F32(bd["a"] / 158.0)
    # iliac wings: thin plates from the sacro-iliac joint sweeping laterally and anteriorly
    wing_z = (Z < -105) & (Z > -215)
    t = np.clip((-Z - 105) / 110, 0, 1)
    p0x, p0y = F32(45) * sx, F32(ys - 10)
    p1x, p1y = (F32(128) - 45 * t) * sx, F32(ys + 80) - 40 * t
    vx, vy = p1x - p0x, p1y - p0y
    tt = np.clip(((ax - p0x) * vx + (Y - p0y) * vy) / (vx * vx + vy * vy), 0, 1)
    dw = np.sqrt((ax - p0x - tt * vx) ** 2 + (Y - p0y - tt * vy) ** 2)
    wing = wing_z & (dw < 6 + 6 * t)
    bone |= wing
    # sacrum
    for zc, semi, dy in ((-120, (44, 20, 18), 0), (-155, (38, 17, 18), -10), (-190, (28, 14, 16), -22),
                         (-222, (15, 10, 14), -28)):
        bone |= (X / semi[0]) ** 2 + ((Y - ys - dy) / semi[1]) ** 2 + ((Z - zc) / semi[2]) ** 2 < 1
    # femoral heads, necks, shafts, pubic and ischial rami
    for sgn in (1, -1):
        head = np.array([sgn * 86 * float(sx), ys + 62, -255.0])
        parts = [Tube(np.array([head, head]), np.array([24.0, 24.0])),
                 Tube(np.array([head, head + [sgn * 40, -4, -20], head + [sgn * 42, 0, -90]]), np.array([14, 15, 14.0])),
                 Tube(np.array([head, head + [-sgn * 70, 22, -22]]), np.array([10, 8.0])),
                 Tube(np.array([head, head + [-sgn * 15, -45, -50]]), np.array([12, 10.0]))]
        for tb in parts:
            for a, b, ra, rb, *_ in tb.segments():
                bone |= segment_sdf(X, Y, Z, a, b, ra, rb) < 0
    s.paint(sl, bone & (Y > -400), H["cancellous"] + 30 * s.field("tex", sl), 0)
    edge = bone & ~(np.roll(bone, 1, 0) & np.roll(bone, -1, 0) & np.roll(bone, 1, 1) & np.roll(bone, -1, 1))
    s.paint(sl, edge, H["cortical"], 0)
    # gluteal muscles behind the wings
    for sgn in (1, -1):
        g = ((X - sgn * 70 * sx) / 55) ** 2 + ((Y - ys + 45) / 38) ** 2 + ((Z + 225) / 95) ** 2 < 1
        s.paint(sl, g & ~bone & (s.lab[sl] == 0) & (s.hu[sl] > -150) & (s.hu[sl] < 200), H["muscle"], 0)


def _paint_lesions(an: Anatomy, s: Slab) -> None:
    H = an.hu
    host_hu = {"liver": H["liver"], "right_kidney": H["kcortex"], "left_kidney": H["kcortex"],
               "pancreas": H["pancreas"], "stomach": H["wall"], "spleen": H["spleen"], "node": H["muscle"]}
    for les in an.lesions:
        sl = s.box(*les.bbox())
        if sl is None:
            continue
        X, Y, Z = s.xyz(sl)
        d = les.sdf(X, Y, Z)
        cur = s.hu[sl]
        ok = (cur > -300) & (cur < 400)  # soft tissue only: not air, lung or bone
        m = (d < 0) & ok
        base = max(8.0, host_hu[les.host] + les.hu_delta)
        s.paint(sl, m, base + 8 * s.field("tex", sl), LESION)
        if les.necrotic:
            s.paint(sl, m & (d < -0.45 * les.radius_mm), F32(15) + 5 * s.field("tex", sl))
