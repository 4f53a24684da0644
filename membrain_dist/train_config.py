"""Settings of training and its augmentation (no torch: a process that only schedules work,
such as the ``predict`` driver, reads configurations without importing torch).

:mod:`membrain_dist.training` and :mod:`membrain_dist.augment` use them; ``training.TrainConfig``
and ``augment.AugmentConfig`` stay importable from there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

__all__ = ["AugmentConfig", "Rotation", "EpochMode", "TrainConfig"]

Rotation = Literal["any", "quarter", "none"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings (paper: random rotations about z, flips along x and y, noise).

    Attributes
    ----------
    rotation : {"any", "quarter", "none"}
        Rotation about the normal: any angle (interpolated), 90-degree multiples (exact), or none.
    flip : bool
        Random flips along each in-plane axis, independently with probability 1/2.
    noise_std : float
        Standard deviation of additive Gaussian noise, in normalised intensity units (the
        cubes are z-scores clipped at +-3, so 0.1 is 10 % of the tomogram's standard deviation).
    noise_sigma : float
        Correlation length of that noise (voxels, Gaussian sigma); 0 = white. The noise is
        rescaled to ``noise_std`` after smoothing.
    wedge_prob : float
        Share of cubes filtered by a missing wedge with a random beam axis (see the module
        docstring); 0 disables it.
    wedge_deg : float
        Tilt range of that wedge (+- degrees; the data's own acquisition range, 60 typically).
    wedge_cone_deg : float
        The wedge's beam axis is drawn within this angle of the normal: 90 = any direction,
        30 = membranes seen face-on (their normal inside the missing wedge of a +-60 tilt).
    normal_shift : int
        Each cube's content moved along the normal by a whole number of voxels drawn uniformly
        in ``[-normal_shift, normal_shift]`` (the slices it uncovers repeat the edge slice): a
        sampled point stands at another height in the bilayer on a thicker or thinner
        segmentation. 0 disables it.
    """

    rotation: Rotation = "quarter"
    flip: bool = True
    noise_std: float = 0.1
    noise_sigma: float = 0.0
    wedge_prob: float = 0.0
    wedge_deg: float = 60.0
    wedge_cone_deg: float = 90.0
    normal_shift: int = 0

    def __post_init__(self) -> None:
        if self.rotation not in ("any", "quarter", "none"):
            raise ValueError(f"rotation must be 'any', 'quarter' or 'none', got {self.rotation!r}")
        if not self.noise_std >= 0 or not self.noise_sigma >= 0:
            raise ValueError(
                f"noise_std and noise_sigma must be >= 0, got {self.noise_std}, {self.noise_sigma}")
        if not 0 <= self.wedge_prob <= 1:
            raise ValueError(f"wedge_prob must be in [0, 1], got {self.wedge_prob}")
        if self.normal_shift < 0:
            raise ValueError(f"normal_shift must be >= 0, got {self.normal_shift}")
        if not 0 < self.wedge_deg <= 90:
            raise ValueError(f"wedge_deg must be in (0, 90], got {self.wedge_deg}")
        if not 0 <= self.wedge_cone_deg <= 90:
            raise ValueError(f"wedge_cone_deg must be in [0, 90], got {self.wedge_cone_deg}")


EpochMode = Literal["balanced", "full"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults follow the paper where it gives numbers.

    Attributes
    ----------
    lr : float
        Adam learning rate. 1e-3, above the paper's grid (3e-5 .. 3e-4): one annotated
        tomogram gives few steps per epoch, and 1e-4 was still far from converged after 40
        epochs (batch 1024); 1e-3 reached its best validation loss in ~20-25 epochs at batch
        1024 and in ~11 at batch 256.
    weight_decay : float
        Adam (L2) weight decay. 1e-3: the top of the paper's grid (0 .. 1e-3); v1 shipped 0.01,
        outside the grid the paper reports, so we stay inside it and leave 0.01 one flag away
        (hard phantom, one membrane, tuning seed 101, training seeds 0-3: 0.01 gave held-out
        F1 0.513 / 0.606 / 0.625 / 0.515, mean 0.565, against 0.580 with 1e-3).
    batch_size : int
        Cubes per step. 256, below the paper's 1024: one annotated tomogram (~10k cubes) gives
        4x the optimiser steps per epoch, and 12^3 cubes train faster per cube on a CPU in
        smaller batches. On the demo campaign (seed 0) the best validation loss came at epoch
        11 instead of 20 (312 s vs 642 s of training) with held-out F1 0.844 vs 0.839.
    max_epochs : int
        Upper bound on (balanced) epochs. 30: on a 128 x 256 x 256 tomogram of 51k training
        points (seed 0 of ``benchmarks/training.py``, the tuning seed) the best epoch came at
        18-27 in every setting tried; on seed 1 the validation loss still crept down to epoch
        39 of 40, but by 2 % after epoch 24. With ``max_epoch_cubes`` this bounds a CPU run at
        about 5 min on 2 cores (16 channels) whatever the annotated area.
    patience : int
        Stop after this many epochs without a validation improvement larger than ``min_delta``.
        8 (was 30): with the learning-rate schedule below, the validation loss of the tuning
        run improved last at epoch 25 and not once more in 8 (seed 0: best 0.2373 at epoch 25,
        33 epochs, 305 s, held-out F1 0.918); patience 6 with ``lr_patience`` 2 stopped at epoch
        24 (254 s) but at F1 0.905; a constant rate with patience 15 wandered to epoch 42
        (472 s, F1 0.905).
    min_delta : float
        Smallest validation-loss decrease that counts as an improvement.
    val_fraction : float
        Fraction of rows held out (whole membranes, :func:`split_validation`) when no
        validation set is given.
    seed : int
        Seeds weight init, shuffling, augmentation and the validation split.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    channels : int
        Convolution channels of :class:`~membrain_dist.model.MemBrainCNN`. Default 16: on a
        2-core CPU it trains 5x faster than v1's 32 (1580 vs 330 cubes/s measured); pass 32
        to reproduce v1 exactly (cheap on a GPU). 8 scores about twice as fast on a CPU
        (end to end on 300 x 1000 x 1000, 2 workers: 0.80x the wall time of 16, README);
        on the hard phantom (one membrane, tuning seed 101, training seeds 0-3) held-out F1
        0.480 / 0.548 / 0.616 / 0.603 (mean 0.562) against 0.511 / 0.588 / 0.649 / 0.570
        (0.580) with 16.
    rotation, flip, noise_std :
        Augmentation (:class:`AugmentConfig`). Exact quarter turns
        (``"quarter"``, default) match what inference sees (no interpolation blur, no zeroed
        corners): on the hard phantom (tuning seed 101 of ``benchmarks/accuracy.py``) held-out
        F1 0.825 against 0.694 with ``"any"`` angle from one annotated tomogram, 0.503
        against 0.400 from one membrane. (On the easy phantom of before, ``"any"`` had
        scored 0.918 against 0.897.)
    noise_sigma :
        Correlation length of the added noise (voxels; 0 white). Noise at real levels
        (``noise_std`` 0.5, ``noise_sigma`` 1) did not help: one membrane, tuning seed 101,
        F1 0.512 against 0.546.
    wedge_prob, wedge_deg, wedge_cone_deg :
        A quarter of the cubes filtered by a +-60 degree missing wedge whose beam lies within 30
        degrees of the normal: the training membrane as it would look face-on, where its bilayer
        falls in the missing wedge (:func:`~membrain_dist.augment.random_wedge`). Trained on one
        edge-on membrane without it the model picks nothing on face-on sheets (F1 0 in each of
        three runs). Hard phantom, one membrane, tuning seed 101 with training seeds 0 and 1,
        then seed 104; held-out F1 of all scenarios (at the smoothed calibration) and of the
        face-on sheets (as run; the first, third and fourth rows ran with the raw one):

        ============================  ===================  ===================
        augmentation                  all                  face-on sheets
        ============================  ===================  ===================
        none                          0.558 0.513 0.517    0 0 0
        half, beam within 30 deg      0.524 0.581 0.616    0.474 0.511 0.414
        a quarter, within 30 deg      0.508 0.578 0.667    0.324 0.324 0.400
        half, beam anywhere           0.547 0.469 0.606    0.235 0 0.308
        ============================  ===================  ===================

        Half of the cubes would give the sheets more, but on the demo campaign (easy phantom,
        then without a validation row, so the threshold stayed at 4.0) it scored F1 0.725 (P 0.607) where a
        quarter scored 0.839 (P 0.925, R 0.767), as without (0.834). ``wedge_prob`` 0 turns it
        off; set ``wedge_deg`` to the data's tilt range.
    normal_shift :
        Each training cube's content moved along the normal by up to this many whole voxels
        (uniform integer in ``[-normal_shift, normal_shift]``,
        :func:`~membrain_dist.augment.shift_along_normal`): on a segmentation 3-7 voxels thick,
        with staircase edges, a sampled point stands at varying heights in the bilayer, and one
        annotated membrane shows only its own. Hard phantom, one membrane, held-out F1 of the
        tuning campaigns 101 (training seeds 0 / 1 / 2) and 104 (seeds 0 / 1) with 2: 0.617 /
        0.625 / 0.653 and 0.712 / 0.680 against 0.514 / 0.592 / 0.619 and 0.648 / 0.672
        without (mean 0.657 against 0.609; 1 voxel: 101 0.608 / 0.553, 104 0.738; 3: 101
        0.686 / 0.590); but on the campaigns not tuned on, 102 / 103, 0.762 / 0.584 against
        0.672 / 0.633 from one membrane and 0.721 / 0.682 against 0.729 / 0.626 from the real
        thylakoid membrane (mean +0.02, in-plane errors 2-6 degrees worse), and on the demo's
        phantom (exact segmentations, particles on the face) F1 0.751 (P 0.964, R 0.615)
        against 0.858. Default 0 (off).
    balance : float
        Share of near-particle cubes (label below the clip) in an epoch, in [0, 1); 0 = plain
        shuffling of all rows. Validation loss weights the near and far means the same way.
        Default 0.5: as many far cubes as near ones.
    epoch : {"balanced", "full"}
        ``"balanced"`` (default, :func:`draw_epoch`): every near cube once plus a fresh draw of
        far cubes each epoch, so that near cubes make up ``balance`` of it (at least
        ``min_epoch_cubes`` in all). ``"full"``: the earlier scheme, one draw with replacement
        per training row weighted to ``balance`` (epochs grow with the annotated area).
    lr_patience, lr_factor, min_lr :
        Learning-rate schedule on the validation loss (``ReduceLROnPlateau``): after
        ``lr_patience`` epochs without improvement the rate is multiplied by ``lr_factor``,
        never below ``min_lr``. ``lr_factor`` 1 keeps it constant (the trainer before
        balanced epochs). With a constant 1e-3 the validation loss jumped by up to 60 % from
        one epoch to the next late in training; decayed, it settles in a few epochs.
    min_epoch_cubes, max_epoch_cubes : int
        Smallest and largest balanced epoch. With few annotated particles the near cubes are
        repeated (each augmented anew) up to ``balance * min_epoch_cubes``; with many, a fresh
        subset of ``balance * max_epoch_cubes`` is drawn each epoch, so an epoch costs at most
        ~10 s on 2 cores (12,288 cubes at ~1,300 cubes/s) however large the annotated area
        (16,384 on benchmark seed 2, whose 65k training points fill it, took 396 s for 30
        epochs).
    val_cubes : int
        Validation (and the epoch-0 training loss) on at most this many cubes, a fixed
        subsample stratified into near and far halves (:func:`stratified_subset`); 0 = all.
    amp : bool
        bfloat16 autocast for the forward passes (float32 weights and optimiser) where the
        device computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16
        or AMX (:func:`~membrain_dist.inference.native_bfloat16`); float32 elsewhere. On this
        project's 2-core Xeon (AMX) 1.8x an epoch, the same best epochs and held-out F1 as
        float32 (README, "bfloat16 on the CPU").
    huber_beta : float
        Smooth L1 transition point (voxels): quadratic below, linear above.
    num_threads : int or None
        CPU threads for torch (None: the dask worker's thread count, else torch's default).
    members : int
        Networks trained (seeds ``seed``, ``seed + 1``, ...; each with its own early stop) and
        averaged, member ``k`` on the cube turned by ``k`` quarter turns
        (:class:`~membrain_dist.model.MemBrainEnsemble`). Default 1. A member costs what one
        network costs to train, but prediction costs the same: ``fit_model`` divides the
        prediction's ``rotations`` by the members, so four score a cube with the four passes
        one network makes at ``rotations`` 4. Hard phantom, one annotated membrane (10-20
        particles), held-out F1 of single networks (seeds 0-3, ``rotations`` 4) against the
        ensemble of four:

        ======================  ==========================  ============  ================
        campaign                single networks             their mean    ensemble of four
        ======================  ==========================  ============  ================
        101 (tuning)            0.511 0.588 0.649 0.570     0.580         0.626
        104 (tuning)            0.677 0.682 0.667 0.683     0.677         0.696
        102 (held out)          0.667 (seed 0)                            0.669
        103 (held out)          0.554 (seed 0)                            0.654
        102, real membrane      0.708 (seed 0)                            0.711
        103, real membrane      0.631 (seed 0)                            0.628
        ======================  ==========================  ============  ================

        Steadier (one network's F1 swung by 0.14 with the seed alone on campaign 101) and
        above the single networks' mean where that was measured; the real membrane (48
        particles) gained little for four times the training time (21 min on 2 CPU cores
        against ~5), so one network is the default. Worth it for a membrane of a few dozen
        particles or fewer, and on a GPU, where a member trains in seconds.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 8
    min_delta: float = 0.0
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    channels: int = 16
    rotation: Rotation = "quarter"
    flip: bool = True
    noise_std: float = 0.1
    noise_sigma: float = 0.0
    wedge_prob: float = 0.25
    wedge_deg: float = 60.0
    wedge_cone_deg: float = 30.0
    normal_shift: int = 0
    huber_beta: float = 1.0
    balance: float = 0.5
    epoch: EpochMode = "balanced"
    lr_patience: int = 3
    lr_factor: float = 0.3
    min_lr: float = 1e-5
    min_epoch_cubes: int = 4096
    max_epoch_cubes: int = 12288
    val_cubes: int = 4096
    amp: bool = True
    num_threads: int | None = None
    members: int = 1

    def __post_init__(self) -> None:
        positive = {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "channels": self.channels,
            "huber_beta": self.huber_beta,
        }
        for name, v in positive.items():
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.weight_decay < 0 or self.min_delta < 0:
            raise ValueError("weight_decay and min_delta must be >= 0")
        if not 0 <= self.balance < 1:
            raise ValueError(f"balance must be in [0, 1), got {self.balance}")
        if self.epoch not in ("balanced", "full"):
            raise ValueError(f"epoch must be 'balanced' or 'full', got {self.epoch!r}")
        if not 0 < self.lr_factor <= 1 or self.lr_patience < 0 or self.min_lr < 0:
            raise ValueError("need 0 < lr_factor <= 1, lr_patience >= 0 and min_lr >= 0")
        if not 2 <= self.min_epoch_cubes <= self.max_epoch_cubes or self.val_cubes < 0:
            raise ValueError("need 2 <= min_epoch_cubes <= max_epoch_cubes and val_cubes >= 0")
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _ = self.augment  # validates

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in fields(AugmentConfig)})
