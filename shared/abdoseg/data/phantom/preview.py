"""PNG previews of a phantom case (axial, coronal, sagittal; image | label overlay side by side).

``python -m abdoseg.data.phantom.preview docs/images`` writes ``phantom_{axial,coronal,sagittal}.png``.
Views follow the radiological convention (patient right on the image left, anterior up in axial,
superior up in coronal/sagittal).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from abdoseg.io import atomic_path
from abdoseg.labels import LABELS
from abdoseg.data.phantom import build_case, plan_case


def save_previews(out_dir: str, seed: int = 0, index: int = 2, preset: str = "medium",
                  window_hu: tuple[float, float] = (-160.0, 240.0)) -> list[str]:
    """Render case ``index`` of dataset ``seed`` in RAS order and write three PNGs; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plan = plan_case(seed, index, preset, axcodes="RAS")
    case = build_case(plan)
    img, lab = case["image"].astype(np.float32), case["label"]
    sx, sy, sz = plan.out_spacing_mm
    g = plan.grid
    colors = np.array(plt.get_cmap("tab20").colors + plt.get_cmap("Set1").colors)[:15]
    colors = np.concatenate([colors, np.ones((15, 1))], axis=1)
    colors[0, 3] = 0
    cmap = ListedColormap(colors)
    cz = np.argwhere(lab == 4).mean(axis=0).round().astype(int) if (lab == 4).any() else np.array(img.shape) // 2
    views = {
        "axial": (lambda a: a[:, :, cz[2]].T[::-1, ::-1], sy / sx),
        "coronal": (lambda a: a[:, int(np.argmin(np.abs(g.ys + 25))), :].T[::-1, ::-1], sz / sx),
        "sagittal": (lambda a: a[int(np.argmin(np.abs(g.xs - 45))), :, :].T[::-1, ::-1], sz / sy),
    }
    out = []
    present = [c for c in range(1, 15) if (lab == c).any()]
    for name, (cut, aspect) in views.items():
        im, lb = cut(img), cut(lab)
        fig, axs = plt.subplots(1, 2, figsize=(10, 5.6))
        for ax in axs:
            ax.imshow(np.clip(im, *window_hu), cmap="gray", aspect=aspect, interpolation="bilinear")
            ax.axis("off")
        axs[1].imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=14, alpha=0.55, aspect=aspect,
                      interpolation="nearest")
        fig.legend(handles=[Patch(color=colors[c], label=f"{c} {LABELS[c]}") for c in present],
                   loc="lower center", ncol=5, fontsize=7, frameon=False)
        fig.suptitle(f"phantom seed {seed} case {index + 1} ({preset}, {plan.anatomy.phase} phase): {name}, "
                     f"{img.shape} voxels of {sx:.2f}x{sy:.2f}x{sz:.2f} mm", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        path = Path(out_dir) / f"phantom_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        out.append(str(path))
    return out


if __name__ == "__main__":
    print("\n".join(save_previews(*(sys.argv[1:2] or ["docs/images"]))))
