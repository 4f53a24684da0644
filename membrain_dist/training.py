"""Training loop for the scoring CNN (paper section 3).

Adam on a smooth L1 (Huber) loss, on-the-fly augmentation (:mod:`membrain_dist.augment`), the
checkpoint with the lowest validation loss kept, early stopping after ``patience`` epochs without
improvement. Seeded end to end: the same data, config and seed give the same history on CPU
(deterministic algorithms are switched on for the duration of the run and restored after).

Epochs are of bounded size (:func:`draw_epoch`): nearly every sampled point of an annotated
membrane is far from any particle and carries the capped label, so an epoch holds every
near-particle cube once and a fresh random draw of far cubes, not the whole annotated area.
Validation runs on a fixed, stratified subsample (:func:`stratified_subset`). Both keep the cost
of an epoch proportional to the particles annotated, not to the membrane area.

Memory: training cubes (numpy or zarr arrays) are copied once into one float32 torch tensor on
the training device. Training data come from a few annotated membranes (tens to hundreds of
thousands of 12^3 cubes, 6.9 kB each: well under a few GB), so this is the simple and fast choice;
inference, which sees whole campaigns, streams instead (:mod:`membrain_dist.inference`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from membrain_dist.augment import augment
from membrain_dist.inference import (
    configure_threads,
    inference_model,
    memory_layout,
    native_bfloat16,
    resolve_device,
)
from membrain_dist.model import MemBrainCNN, MemBrainEnsemble
from membrain_dist.train_config import TrainConfig

__all__ = [
    "TrainConfig",
    "draw_epoch",
    "draw_class_epoch",
    "stratified_subset",
    "EpochStats",
    "TrainResult",
    "train",
    "split_validation",
    "config_dict",
    "log_epoch",
]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EpochStats:
    """One epoch's outcome; epoch 0 is the untrained model (both losses without augmentation,
    its training loss on a stratified subsample of the training rows as for validation).

    ``train_loss`` of later epochs is the mean over the epoch's augmented batches; ``cubes`` the
    training cubes it saw. Time left, from the mean epoch time so far: ``eta_seconds`` up to
    ``max_epochs`` (a bound), ``stop_seconds`` up to the early stop should no later epoch
    improve (both 0 when this epoch is the last); in an ensemble (``member`` of ``members``,
    0-based) both include the members still to train. Equality ignores the timings, so two
    seeded runs compare equal when their losses do.
    """

    epoch: int
    max_epochs: int
    train_loss: float
    val_loss: float
    best_epoch: int
    best_val_loss: float
    seconds: float = field(compare=False)
    cubes: int = 0
    eta_seconds: float = field(default=0.0, compare=False)
    stop_seconds: float = field(default=0.0, compare=False)
    member: int = 0
    members: int = 1

    def line(self) -> str:
        """One human-readable progress line."""
        head = f"epoch {self.epoch}/{self.max_epochs}"
        if self.members > 1:
            head = f"member {self.member + 1}/{self.members} {head}"
        if self.epoch == 0:
            return (f"{head} (untrained)  train {self.train_loss:.4f}  val {self.val_loss:.4f}"
                    f"  ({self.seconds:.1f} s)")
        eta = ""
        if self.stop_seconds > 0:  # 0: this epoch is the last
            eta = f"  <= {_duration(self.eta_seconds)} left"
            if self.stop_seconds < self.eta_seconds:
                eta += f" ({_duration(self.stop_seconds)} if no better epoch)"
        return (f"{head}  train {self.train_loss:.4f}  val {self.val_loss:.4f}  best "
                f"{self.best_val_loss:.4f} @ {self.best_epoch}  {self.cubes} cubes in "
                f"{self.seconds:.1f} s{eta}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


@dataclass(frozen=True)
class TrainResult:
    """The best model (eval mode, on the training device) and how it got there."""

    model: MemBrainCNN | MemBrainEnsemble
    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float
    #: (N,) bool over the training rows: the rows held out for validation, when no validation
    #: set was given (:func:`split_validation`); None otherwise
    held_out: np.ndarray | None = None
    #: an ensemble's members' own results (``history`` etc. above are the first member's)
    members: list[TrainResult] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Summary for ``ModelMeta.metrics``; an ensemble's is its first member's with the
        members' mean ``best_val_loss``, their total ``train_seconds`` and each member's
        summary under ``members``."""
        if self.members:
            per = [m.metrics() for m in self.members]
            return {**per[0], "best_val_loss": float(np.mean([m["best_val_loss"] for m in per])),
                    "train_seconds": round(sum(m["train_seconds"] for m in per), 1),
                    "members": per}
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "initial_val_loss": self.history[0].val_loss,
            "epochs_run": self.history[-1].epoch,
            "final_train_loss": self.history[-1].train_loss,
            "train_seconds": round(sum(h.seconds for h in self.history), 1),
            "cubes_per_epoch": self.history[-1].cubes,
        }


def split_validation(
    groups: np.ndarray,
    val_fraction: float = 0.2,
    seed: int = 0,
    zyx: np.ndarray | None = None,
) -> np.ndarray:
    """Validation mask that holds out whole membranes.

    Neighbouring points of one membrane see overlapping cubes, so a random row split would leak.
    With three or more groups, groups are taken in a seeded random order until about
    ``val_fraction`` of the rows are held out (at least one group, never all). With one or two
    groups (one annotated membrane, which the paper says must suffice, or a tomogram with two:
    holding one out would take half the data) a spatial slab of every group is held out
    instead: the ``val_fraction`` of its points furthest along their principal axis when
    ``zyx`` is given, else its last ``val_fraction`` of rows (the geometry stage emits points in
    raster order, so that is a slab as well).

    Parameters
    ----------
    groups : (N,) int array
        Membrane id per row.
    val_fraction : float
        Target fraction of rows in validation.
    seed : int
    zyx : (N, 3) float array, optional
        Point coordinates (voxels), used for the single-membrane slab.

    Returns
    -------
    (N,) bool array, True for validation rows.
    """
    g = np.asarray(groups).ravel()
    n = len(g)
    if n < 2:
        raise ValueError("need at least two rows to split")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if len(ids) >= _MIN_GROUPS_HELD_OUT_WHOLE:
        target = val_fraction * n
        order = np.random.default_rng(seed).permutation(len(ids))
        before = np.cumsum(counts[order]) - counts[order]  # rows held out before this group
        take = before < target
        take[0] = True
        take[-1] = take[-1] and take.sum() < len(ids)
        chosen = np.zeros(len(ids), dtype=bool)
        chosen[order[take]] = True
        return chosen[inverse]
    p = None if zyx is None else np.asarray(zyx, dtype=np.float64).reshape(n, 3)
    mask = np.zeros(n, dtype=bool)
    for k in range(len(ids)):
        rows = np.flatnonzero(inverse == k)
        if len(rows) >= 2:
            mask[rows[_slab(len(rows), val_fraction, None if p is None else p[rows])]] = True
    if not mask.any():  # groups of one row each: hold out one row
        mask[-1] = True
    return mask


_MIN_GROUPS_HELD_OUT_WHOLE = 3


def _slab(n: int, fraction: float, zyx: np.ndarray | None) -> np.ndarray:
    """Indices of the ``fraction`` of ``n`` points furthest along their principal axis (the last
    rows without coordinates); at least one, never all."""
    k = max(1, min(n - 1, int(round(fraction * n))))
    if zyx is None:
        return np.arange(n - k, n)
    p = zyx - zyx.mean(axis=0)
    axis = np.linalg.eigh(p.T @ p)[1][:, -1]
    return np.argsort(p @ axis, kind="stable")[n - k :]


def _to_tensor(a: Any, device: torch.device, name: str, ndim: int | tuple[int, ...]
               ) -> torch.Tensor:
    """``a`` (numpy, zarr or a tensor) as a float32 tensor on ``device``, checked: its
    dimensions and finite values (ValueError naming ``name``). A tensor already there is not
    copied."""
    if isinstance(a, torch.Tensor):
        t = a.to(device, torch.float32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a[...], dtype=np.float32)).to(device)
    if t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values")
    return t


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:  # full CUDA determinism needs CUBLAS_WORKSPACE_CONFIG; cuDNN's is the part that matters
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


def _near(y: torch.Tensor) -> torch.Tensor:
    """Rows whose label is below the clip distance (the label maximum): near a particle (of
    any class, for ``(N, C)`` labels)."""
    near = y < y.max() - 1e-4
    return near.any(1) if near.dim() == 2 else near


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when ``amp`` and ``device`` computes bfloat16 natively (a CUDA GPU that
    supports it, a CPU with AVX512-BF16 or AMX: :func:`~membrain_dist.inference.
    native_bfloat16`); a no-op elsewhere."""
    if amp and native_bfloat16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate(model: MemBrainCNN, x: torch.Tensor, y: torch.Tensor, bs: int, beta: float,
              balance: float = 0.0, amp: bool = False) -> float:
    """Mean smooth-L1 loss; with ``balance`` > 0 the near and far rows' means are weighted
    ``balance : 1 - balance`` (the same mix the training epochs see). Runs an eval-mode copy
    with BatchNorm folded into the convolutions (:func:`~membrain_dist.inference.
    inference_model`, 1.5-1.8x faster on the CPU); ``model`` keeps its mode."""
    folded = inference_model(model, x.device, script=False)  # weights change every epoch
    layout = memory_layout(x.device)
    losses = []
    with torch.inference_mode(), _autocast(x.device, amp):
        for s in range(0, len(x), bs):
            pred = folded(x[s : s + bs].unsqueeze(1).contiguous(memory_format=layout)).float()
            losses.append(F.smooth_l1_loss(pred, y[s : s + bs], beta=beta, reduction="none"))
    per_row = torch.cat(losses).double()
    if per_row.dim() == 2:  # one loss per class: the mean of each class's (balanced) loss
        return sum(_balanced_mean(per_row[:, c], y[:, c] < y.max() - 1e-4, balance)
                   for c in range(per_row.shape[1])) / per_row.shape[1]
    return _balanced_mean(per_row, _near(y), balance)


def _balanced_mean(per_row: torch.Tensor, near: torch.Tensor, balance: float) -> float:
    """Mean of ``per_row``; with ``balance`` > 0 the ``near`` and far rows' means weighted
    ``balance : 1 - balance``."""
    if balance <= 0 or not bool(near.any()) or bool(near.all()):
        return float(per_row.mean())
    return float(balance * per_row[near].mean() + (1 - balance) * per_row[~near].mean())


def draw_class_epoch(
    y: torch.Tensor,
    balance: float,
    min_cubes: int,
    gen: torch.Generator,
    max_cubes: int | None = None,
) -> torch.Tensor:
    """Row indices of one balanced epoch for ``(N, C)`` labels, shuffled: one
    :func:`draw_epoch` per class (near = below that class's clip, with ``1/C`` of the epoch
    bounds), so that a class with few annotations is as present as a frequent one: the rows
    far from class ``c`` (near another class or none) are its negatives."""
    n_classes = int(y.shape[1])
    near = y < y.max() - 1e-4
    parts = [draw_epoch(near[:, c], balance, max(2, math.ceil(min_cubes / n_classes)), gen,
                        None if max_cubes is None else max(2, max_cubes // n_classes))
             for c in range(n_classes)]
    rows = torch.cat(parts)
    return rows[torch.randperm(len(rows), generator=gen, device=rows.device)]


def draw_epoch(
    near: torch.Tensor,
    balance: float,
    min_cubes: int,
    gen: torch.Generator,
    max_cubes: int | None = None,
) -> torch.Tensor:
    """Row indices of one balanced epoch, shuffled.

    Every near-particle row (``near`` True) appears, all of them equally often up to one: when
    there are fewer than ``balance * min_cubes`` they are repeated to that count; when there
    are more than ``balance * max_cubes`` a fresh subset of that many is drawn (without
    replacement). Far rows are drawn without replacement, a fresh subset each call, so that
    the near rows make up ``balance`` of the epoch (all far rows when there are fewer). With
    ``balance`` 0, or no near or no far rows, the epoch is a permutation of all rows.

    Parameters
    ----------
    near : (N,) bool tensor
    balance : float in [0, 1)
    min_cubes, max_cubes : int
        Smallest epoch (rows) when near rows are scarce; largest (None: unbounded) when they
        are plenty.
    gen : torch.Generator
        All draws come from it (on its device): a seeded generator gives the same epochs.
    """
    dev = near.device
    near_rows = torch.nonzero(near).flatten()
    far_rows = torch.nonzero(~near).flatten()
    n_near, n_far = len(near_rows), len(far_rows)
    if balance <= 0 or n_near == 0 or n_far == 0:
        return torch.randperm(len(near), generator=gen, device=dev)
    k_near = max(n_near, math.ceil(balance * min_cubes))
    if max_cubes is not None:
        k_near = max(1, min(k_near, math.floor(balance * max_cubes)))
    k_far = min(n_far, round(k_near * (1 - balance) / balance))
    reps, rest = divmod(k_near, n_near)
    picked = [near_rows.repeat(reps),
              near_rows[torch.randperm(n_near, generator=gen, device=dev)[:rest]],
              far_rows[torch.randperm(n_far, generator=gen, device=dev)[:k_far]]]
    rows = torch.cat(picked)
    return rows[torch.randperm(len(rows), generator=gen, device=dev)]


def stratified_subset(near: np.ndarray, max_rows: int, balance: float, seed: int) -> np.ndarray:
    """Sorted row indices of a fixed subsample of at most ``max_rows`` rows.

    With ``balance`` > 0 (losses weigh the near and far means separately) half the rows come
    from each stratum, the rest of a short stratum's quota from the other, so both means are
    estimated from as many rows as the budget allows; with ``balance`` 0 a plain random
    subset. ``max_rows`` 0, or at least ``len(near)``, keeps every row.
    """
    near = np.asarray(near, dtype=bool)
    n = len(near)
    if max_rows <= 0 or n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if balance <= 0:
        return np.sort(rng.choice(n, max_rows, replace=False))
    strata = [np.flatnonzero(near), np.flatnonzero(~near)]
    quota = [min(len(strata[0]), max_rows // 2)]
    quota.append(min(len(strata[1]), max_rows - quota[0]))
    quota[0] = min(len(strata[0]), max_rows - quota[1])
    return np.sort(np.concatenate([rng.choice(rows, q, replace=False)
                                   for rows, q in zip(strata, quota, strict=True)]))


def _epoch_order(y: torch.Tensor, balance: float, gen: torch.Generator) -> torch.Tensor:
    """Row order of one ``"full"`` epoch: a permutation, or with ``balance`` > 0 ``len(y)``
    draws with replacement in which near-particle rows make up that fraction."""
    near = _near(y)
    n_near = int(near.sum())
    if balance <= 0 or n_near == 0 or n_near == len(y):
        return torch.randperm(len(y), generator=gen, device=y.device)
    w = torch.where(near, balance / n_near, (1 - balance) / (len(y) - n_near)).float()
    return torch.multinomial(w, len(y), replacement=True, generator=gen)


def _subset(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = stratified_subset(_near(y).cpu().numpy(), cfg.val_cubes, cfg.balance, seed)
    if len(rows) == len(y):
        return x, y
    idx = torch.from_numpy(rows).to(y.device)
    return x[idx], y[idx]


def _eta(seconds: list[float], epoch: int, best_epoch: int, cfg: TrainConfig
         ) -> tuple[float, float]:
    """Seconds left after ``epoch`` from the mean of the epochs' ``seconds`` so far: to
    ``max_epochs``, and to the early stop without a better epoch (see :class:`EpochStats`)."""
    mean = sum(seconds) / len(seconds)
    to_end = cfg.max_epochs - epoch
    to_stop = min(to_end, cfg.patience - (epoch - best_epoch))
    return max(0, to_end) * mean, max(0, to_stop) * mean


def log_epoch(stats: EpochStats) -> None:
    """A ``progress`` callback: :meth:`EpochStats.line` at INFO on this module's logger."""
    log.info("%s", stats.line())


def train(
    train_cubes: Any,
    train_labels: Any,
    val_cubes: Any | None = None,
    val_labels: Any | None = None,
    cfg: TrainConfig | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    *,
    groups: np.ndarray | None = None,
    zyx: np.ndarray | None = None,
) -> TrainResult:
    """Train a :class:`~membrain_dist.model.MemBrainCNN` on labelled cubes.

    Parameters
    ----------
    train_cubes : (N, s, s, s) array-like (numpy or zarr), float32 normalised cubes.
    train_labels : (N,) or (N, C) array-like, distance labels in voxels
        (:mod:`membrain_dist.labels`); ``(N, C)``: one column per particle class, a network
        with ``C`` outputs, the loss averaged over the classes.
    val_cubes, val_labels : (M, s, s, s), (M,) array-like or None
        Validation set. When None, rows of the training set are held out with
        :func:`split_validation` (``groups`` = membrane id per row, ``zyx`` for a single
        membrane; without ``groups`` all rows count as one membrane).
    cfg : TrainConfig
    progress : callable, optional
        Called with an :class:`EpochStats` after epoch 0 (untrained) and after every epoch.

    Returns
    -------
    TrainResult with the best-validation model (eval mode). Validation loss is the mean smooth
    L1 over the validation set without augmentation. With ``cfg.members`` > 1 the networks are
    trained one after the other (seeds ``cfg.seed + k``) and returned as one
    :class:`~membrain_dist.model.MemBrainEnsemble`. torch's thread count is restored on return.
    """
    cfg = cfg or TrainConfig()
    prev_threads = torch.get_num_threads()
    try:
        if cfg.members > 1:  # read (and move to the device) once for every member
            dev = torch.device(resolve_device(cfg.device))
            train_cubes = _to_tensor(train_cubes, dev, "train_cubes", 4)
            train_labels = _to_tensor(train_labels, dev, "train_labels", (1, 2))
            if val_cubes is not None and val_labels is not None:
                val_cubes = _to_tensor(val_cubes, dev, "val_cubes", 4)
                val_labels = _to_tensor(val_labels, dev, "val_labels", (1, 2))
        results = []
        members = cfg.members
        spent = [0.0] * members
        for k in range(members):
            member_progress = progress
            if progress is not None and members > 1:
                def member_progress(st: EpochStats, k: int = k) -> None:
                    progress(_member_stats(st, k, spent))
            # every member holds out the same rows (the ensemble is calibrated on them)
            results.append(_train(train_cubes, train_labels, val_cubes, val_labels,
                                  dataclasses.replace(cfg, seed=cfg.seed + k), member_progress,
                                  groups, zyx, split_seed=cfg.seed))
        if len(results) == 1:
            return results[0]
        first = results[0]
        ensemble = MemBrainEnsemble([r.model for r in results]).eval()
        return TrainResult(ensemble, first.history, first.best_epoch, first.best_val_loss,
                           first.held_out, results)
    finally:
        torch.set_num_threads(prev_threads)


def _member_stats(st: EpochStats, k: int, spent: list[float]) -> EpochStats:
    """Member ``k``'s epoch statistics, its time left extended by the members after it: each
    takes the mean time of the members done, or (while the first trains) this member's bound.
    ``spent`` accumulates each member's seconds."""
    spent[k] += st.seconds
    done = spent[:k]
    per_member = sum(done) / len(done) if done else spent[k] + st.eta_seconds
    later = (len(spent) - k - 1) * per_member
    return dataclasses.replace(st, member=k, members=len(spent), eta_seconds=st.eta_seconds + later,
                               stop_seconds=st.stop_seconds + later)


def _train(
    train_cubes: Any,
    train_labels: Any,
    val_cubes: Any | None,
    val_labels: Any | None,
    cfg: TrainConfig,
    progress: Callable[[EpochStats], None] | None,
    groups: np.ndarray | None,
    zyx: np.ndarray | None,
    split_seed: int,
) -> TrainResult:
    dev = torch.device(resolve_device(cfg.device))
    threads = configure_threads(cfg.num_threads) if dev.type == "cpu" else None
    x = _to_tensor(train_cubes, dev, "train_cubes", 4)
    y = _to_tensor(train_labels, dev, "train_labels", (1, 2))
    if len(x) != len(y):
        raise ValueError(f"{len(x)} training cubes but {len(y)} labels")
    if (val_cubes is None) != (val_labels is None):
        raise ValueError("give both val_cubes and val_labels, or neither")
    held_out = None
    if val_cubes is None:
        g = np.zeros(len(x), dtype=np.int64) if groups is None else np.asarray(groups)
        if len(g) != len(x):
            raise ValueError(f"groups has {len(g)} rows, training data {len(x)}")
        held_out = split_validation(g, cfg.val_fraction, split_seed, zyx)
        mask = torch.from_numpy(held_out).to(dev)
        xv, yv, x, y = x[mask], y[mask], x[~mask], y[~mask]
    else:
        xv = _to_tensor(val_cubes, dev, "val_cubes", 4)
        yv = _to_tensor(val_labels, dev, "val_labels", (1, 2))
        if len(xv) != len(yv):
            raise ValueError(f"{len(xv)} validation cubes but {len(yv)} labels")
    s = x.shape[1]
    if tuple(x.shape[1:]) != (s, s, s) or tuple(xv.shape[1:]) != (s, s, s):
        raise ValueError(f"cubes must be (N, s, s, s), got {tuple(x.shape)}, {tuple(xv.shape)}")
    if y.shape[1:] != yv.shape[1:]:
        raise ValueError(f"training labels {tuple(y.shape)} and validation labels "
                         f"{tuple(yv.shape)} differ in classes")
    if y.dim() == 2 and y.shape[1] == 1:  # one class: the (N,) labels of a one-output network
        y, yv = y[:, 0], yv[:, 0]
    n_classes = int(y.shape[1]) if y.dim() == 2 else 1
    if len(x) == 0 or len(xv) == 0:
        raise ValueError("training and validation sets must both be non-empty")
    xv, yv = _subset(xv, yv, cfg, split_seed)  # fixed for the whole run (and every member)
    x0, y0 = _subset(x, y, cfg, cfg.seed + 1)  # epoch 0's training loss
    near = _near(y)
    log.info(
        "training on %d cubes (%d^3, %d near a particle), validating on %d, device %s%s%s",
        len(x),
        s,
        int(near.sum()),
        len(xv),
        dev,
        f" ({threads} threads)" if threads else "",
        ", bfloat16 autocast" if cfg.amp and native_bfloat16(dev) else "",
    )

    aug = cfg.augment
    layout = memory_layout(dev)
    ev = dict(bs=cfg.batch_size, beta=cfg.huber_beta, balance=cfg.balance, amp=cfg.amp)
    cuda_ids = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else []
    )
    fork = torch.random.fork_rng(devices=cuda_ids)
    with fork, _deterministic(dev):  # seed locally, leave the caller's RNG state alone
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        model = MemBrainCNN(s, cfg.channels, n_classes=n_classes).to(dev).to(
            memory_format=layout)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=min(cfg.min_lr, cfg.lr),
            threshold=cfg.min_delta, threshold_mode="abs") if cfg.lr_factor < 1 else None
        t0 = time.perf_counter()
        best_loss = _evaluate(model, xv, yv, **ev)
        best_epoch = 0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train0 = _evaluate(model, x0, y0, **ev)
        history = [
            EpochStats(0, cfg.max_epochs, train0, best_loss, 0, best_loss, time.perf_counter() - t0)
        ]
        report = progress or (lambda st: log.debug("%s", st.line()))
        report(history[0])
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if cfg.epoch == "balanced" and y.dim() == 2:
                perm = draw_class_epoch(y, cfg.balance, cfg.min_epoch_cubes, gen,
                                        cfg.max_epoch_cubes)
            elif cfg.epoch == "balanced":
                perm = draw_epoch(near, cfg.balance, cfg.min_epoch_cubes, gen,
                                  cfg.max_epoch_cubes)
            else:
                perm = _epoch_order(y, cfg.balance, gen)
            total = torch.zeros((), dtype=torch.float64, device=dev)
            seen = 0
            for start in range(0, len(perm), cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples; drop a lone remainder
                    continue
                xb = augment(x[idx], aug, gen).unsqueeze(1).contiguous(memory_format=layout)
                with _autocast(dev, cfg.amp):
                    pred = model(xb).float()
                loss = F.smooth_l1_loss(pred, y[idx], beta=cfg.huber_beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double() * len(idx)
                seen += len(idx)
            train_loss = float(total) / max(1, seen)
            val_loss = _evaluate(model, xv, yv, **ev)
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"validation loss became {val_loss} at epoch {epoch}")
            if val_loss < best_loss - cfg.min_delta:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if sched is not None:
                sched.step(val_loss)
            seconds = time.perf_counter() - t0
            eta, stop = _eta([*(h.seconds for h in history[1:]), seconds], epoch, best_epoch, cfg)
            stats = EpochStats(epoch, cfg.max_epochs, train_loss, val_loss, best_epoch, best_loss,
                               seconds, seen, eta, stop)
            history.append(stats)
            report(stats)
            if epoch - best_epoch >= cfg.patience:
                log.info(
                    "early stop at epoch %d: no improvement for %d epochs", epoch, cfg.patience
                )
                break
    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()  # plain tensors to save
    log.info(
        "best validation loss %.4f at epoch %d (initial %.4f), %.0f s of training",
        best_loss,
        best_epoch,
        history[0].val_loss,
        sum(h.seconds for h in history),
    )
    return TrainResult(model, history, best_epoch, best_loss, held_out)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``TrainConfig`` as a JSON-ready dict (for ``ModelMeta.train_config``)."""
    return dataclasses.asdict(cfg)
