"""Quality-control figure: one PNG per tomogram showing at a glance what was picked.

Three panels:

1. a tomogram z-slice (passed in by the caller: one 2D array, never the volume) with the picks
   (circles) and ground truth (crosses) within ``slab`` voxels of the slice;
2. the sampled membrane points projected along z, coloured by predicted distance (a low
   distance is a likely particle), with all picks and ground truth;
3. the histogram of predicted distances, with the clustering threshold.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state: safe in dask workers),
written atomically (temporary file + ``os.replace``). The PNG is ``figsize x dpi`` pixels.
Coordinates are voxels, zyx; images are indexed ``[y, x]``.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["qc_figure"]

log = logging.getLogger(__name__)

#: most membrane points drawn in the projection panel (a random, fixed-seed subset above it)
_MAX_SCATTER = 200_000

#: panel margins, as fractions of the figure (room for tick labels, axis labels and titles)
_MARGINS = dict(left=0.045, right=0.985, bottom=0.11, top=0.87, wspace=0.22)


def _robust_limits(img: np.ndarray) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def qc_figure(
    path: str | os.PathLike,
    points_zyx: np.ndarray,
    scores: np.ndarray,
    picks_zyx: np.ndarray,
    gt_zyx: np.ndarray | None = None,
    *,
    image: np.ndarray | None = None,
    image_z: float | None = None,
    slab: float = 5.0,
    score_threshold: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (15.0, 5.0),
    dpi: int = 100,
) -> Path:
    """Write the QC PNG of one tomogram.

    Parameters
    ----------
    path
        Output PNG; its folder must exist.
    points_zyx : (N, 3)
        Sampled membrane points, voxels, zyx.
    scores : (N,)
        Their predicted distances, voxels.
    picks_zyx : (K, 3)
        Predicted particle centres, voxels, zyx.
    gt_zyx : (M, 3), optional
        Ground-truth centres, voxels, zyx.
    image : (Y, X), optional
        One tomogram z-slice (e.g. the central one); panel 1 is left empty without it.
    image_z : float, optional
        The slice's z index (voxels); marks within ``slab`` of it are drawn on panel 1.
    slab : float
        Half thickness (voxels) of the slab whose picks are drawn on the slice.
    score_threshold : float, optional
        Drawn as a vertical line on the histogram.
    title : str, optional
        Figure title (e.g. the tomogram name).
    figsize, dpi
        Figure size in inches and resolution: the PNG is ``figsize[0] * dpi`` x
        ``figsize[1] * dpi`` pixels.

    Returns
    -------
    Path
        The written PNG.
    """
    out = Path(path)
    pts = np.asarray(points_zyx, dtype=np.float32).reshape(-1, 3)
    sc = np.asarray(scores, dtype=np.float32).reshape(-1)
    if sc.shape[0] != pts.shape[0]:
        raise ValueError(f"{pts.shape[0]} points but {sc.shape[0]} scores")
    picks = np.asarray(picks_zyx, dtype=np.float32).reshape(-1, 3)
    gt = None if gt_zyx is None else np.asarray(gt_zyx, dtype=np.float32).reshape(-1, 3)

    # fixed margins: a constrained layout measures every tick label once more (~40 % of the
    # figure's time, which is most of a tomogram's outputs task)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax_img, ax_pts, ax_hist = fig.subplots(1, 3, gridspec_kw=_MARGINS)
    pick_style = dict(
        marker="o",
        s=60,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=1.2,
        label=f"picks ({len(picks)})",
    )
    gt_style = dict(marker="x", s=40, c="tab:cyan", linewidths=1.2)

    # 1. slice with the picks of the slab around it
    if image is not None:
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"image must be one 2D (Y, X) slice, got shape {img.shape}")
        lo, hi = _robust_limits(img)
        ax_img.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if image_z is not None:
            near = np.abs(picks[:, 0] - image_z) <= slab
            ax_img.scatter(picks[near, 2], picks[near, 1], **pick_style)
            if gt is not None:
                g = np.abs(gt[:, 0] - image_z) <= slab
                ax_img.scatter(gt[g, 2], gt[g, 1], **gt_style)
        ax_img.set_title(
            f"z = {image_z:g} (marks within ±{slab:g})" if image_z is not None else "slice"
        )
    else:
        ax_img.text(0.5, 0.5, "no slice", ha="center", va="center", transform=ax_img.transAxes)
        ax_img.set_title("slice")

    # 2. membrane points projected along z, coloured by predicted distance
    if pts.shape[0]:
        sel = np.arange(pts.shape[0])
        if sel.size > _MAX_SCATTER:
            sel = np.sort(np.random.default_rng(0).choice(sel, _MAX_SCATTER, replace=False))
        order = sel[np.argsort(-sc[sel], kind="stable")]  # low distances drawn on top
        sca = ax_pts.scatter(
            pts[order, 2],
            pts[order, 1],
            c=sc[order],
            s=4,
            cmap="viridis_r",
            linewidths=0,
            rasterized=True,
        )
        fig.colorbar(sca, ax=ax_pts, label="predicted distance (voxels)")
    ax_pts.scatter(picks[:, 2], picks[:, 1], **pick_style)
    if gt is not None:
        ax_pts.scatter(gt[:, 2], gt[:, 1], label=f"ground truth ({len(gt)})", **gt_style)
    ax_pts.set_aspect("equal")
    ax_pts.set_xlabel("x (voxels)")
    ax_pts.set_ylabel("y (voxels)")
    ax_pts.set_title("membrane points (z projection)")
    ax_pts.legend(loc="upper right", fontsize="small")

    # 3. score histogram
    finite = sc[np.isfinite(sc)].astype(np.float64)
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi - lo > 1e-6 * max(abs(lo), abs(hi), 1.0):  # constant scores: one bar
            lo, hi = lo - 0.5, hi + 0.5
        ax_hist.hist(finite, bins=50, range=(lo, hi), color="tab:gray")
        ax_hist.set_yscale("log")
    if score_threshold is not None:
        ax_hist.axvline(
            score_threshold, color="tab:red", ls="--", label=f"threshold {score_threshold:g}"
        )
        ax_hist.legend(loc="upper right", fontsize="small")
    ax_hist.set_xlabel("predicted distance (voxels)")
    ax_hist.set_ylabel("points")
    ax_hist.set_title(f"{pts.shape[0]} points")
    if title:
        fig.suptitle(title)

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("QC figure %s", out)
    return out
