"""``membrain-dist``: the command line.

Thin by design: parse, validate, then call a Prefect flow (or, with ``--sequential``, the plain
in-process pipeline). Heavy imports happen inside the command that needs them, so ``--help``
is instant. Exit codes: 0 success, 1 failure, 2 bad input (the message names the file),
3 some tomograms of a campaign failed while the others finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("membrain_dist")

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3
DEMO_ROTATIONS = 4  # the demo's tomograms are small: the 4x inference cost is seconds


# --------------------------------------------------------------------------- shared options
def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument("--workers", type=int, default=None,
                   help="local dask worker processes (default: one per core, at most 8)")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="use an existing dask scheduler (tcp://host:8786) instead of a local cluster")
    g.add_argument("--gpu-resource", action="store_true",
                   help="with --scheduler: GPU workers were started with --resources GPU=1; "
                        "inference asks for them")
    g.add_argument("--slurm", metavar="YAML", default=None,
                   help="start dask-jobqueue SLURM clusters from this config (deploy/slurm.yaml)")
    g.add_argument("--dashboard", metavar="HOST:PORT", default="127.0.0.1:0",
                   help="where the local dask dashboard listens (default: loopback, a free "
                        "port; it has no authentication: 0.0.0.0 exposes it to the network)")
    g.add_argument("--sequential", action="store_true",
                   help="run in this process without dask or Prefect (debugging, reference)")


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling (dask runs)")
    g.add_argument("--schedule", choices=("stream", "stages"), default="stream",
                   help="stream (default): each tomogram's next stage starts as soon as its "
                        "inputs exist, so CPU and inference workers work at once; stages: "
                        "every tomogram through a stage before the next")
    g.add_argument("--window", type=int, default=None, metavar="N",
                   help="tomograms in flight at once when streaming (default 4)")
    g.add_argument("--cut-on", choices=("auto", "cpu", "inference"), default="auto",
                   help="where the cubes are cut: cpu workers (handed to the inference workers "
                        "in memory; needs --gpu-resource workers on the same scheduler), the "
                        "inference workers, or auto (cpu when possible)")
    g.add_argument("--keep-cubes", action="store_true",
                   help="also write every point's cube to the store (~7 kB per point; "
                        "debugging, training sets)")
    g.add_argument("--group-voxels", type=int, default=None, metavar="N",
                   help="membranes smaller than N labelled voxels share their geometry, "
                        "scoring and clustering tasks, up to N voxels a task (default 131072; "
                        "0: one task per membrane)")


def _schedule(args: argparse.Namespace):
    from flows.stream import Schedule

    extra = {k: v for k, v in (("window", args.window), ("group_voxels", args.group_voxels))
             if v is not None}
    return Schedule(mode=args.schedule, cut_on=args.cut_on, keep_cubes=args.keep_cubes, **extra)


def _add_scoring_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--rotations", type=int, choices=(1, 2, 4, 8), default=None,  # ROTATIONS
                   help="average the scores of 1, 2 or 4 quarter turns of each cube about the "
                        "membrane normal, or 8 (the 4 turns of the cube and of its mirror "
                        "image); inference cost x1 to x8 (times an ensemble's members: train "
                        "divides it by them); default: what the model was trained with; saved "
                        "with a trained model")
    p.add_argument("--precision", choices=("float32", "bfloat16", "auto"),  # config.PRECISIONS
                   default=None,
                   help="arithmetic of the CNN: auto (bfloat16 where the device computes it "
                        "natively, else float32), float32 or bfloat16 (2.3x the cubes/s on a "
                        "CPU with AVX512-BF16 or AMX; scores within a few hundredths of a "
                        "voxel, the same F1); default: the model's (auto; float32 for models "
                        "trained before auto was the default); saved with a trained model")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", default=None,
                   help="stage parameters, one [table] per stage (see docs/ARCHITECTURE.md)")
    p.add_argument("--store", default=None,
                   help="campaign Zarr store (default: <out>/campaign.zarr; train: "
                        "<out>.train.zarr beside the model directory)")


def _cluster_spec(args: argparse.Namespace):
    from flows.runtime import ClusterSpec

    if args.slurm:
        return ClusterSpec(kind="slurm", slurm_config=args.slurm, n_workers=args.workers)
    if args.scheduler:
        return ClusterSpec(kind="address", address=args.scheduler,
                           gpu_resource=args.gpu_resource)
    return ClusterSpec(n_workers=args.workers,
                       dashboard_address=getattr(args, "dashboard", None) or "127.0.0.1:0")


def _base_config(args: argparse.Namespace):
    from .config import PipelineConfig

    return PipelineConfig.from_toml(args.config) if args.config else PipelineConfig()


_VERBOSE = [0]


class _QuietPrefect(logging.Filter):
    """Default verbosity: Prefect's own INFO lines (task and flow states, run log lines) go
    to the API and the dashboard, not to the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("prefect")


def _setup_logging(verbose: int) -> None:
    _VERBOSE[0] = verbose
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("distributed", "httpx", "numexpr", "matplotlib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    # Prefect's run loggers at INFO at every verbosity: their lines (and the library's,
    # flows.logs) reach the API; the terminal shows them with -v only (here through the
    # filter, in dask workers through Prefect's console handler level)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if verbose < 1:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietPrefect())
    # distributed sets its loggers' levels from dask's config when it is imported (after this)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning" if verbose < 2 else "info")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextlib.contextmanager
def _writing(*targets: tuple[Path, str]):
    """Hold the one-writer lock of each (folder or store) for the block; an interrupt then
    says what is kept there."""
    from . import interrupts
    from .lock import output_lock

    with contextlib.ExitStack() as stack:
        for path, kind in targets:
            stack.enter_context(output_lock(path, kind))
        where = " and ".join(str(p) for p, _ in targets)
        interrupts.set_kept(f"finished work is kept in {where}; rerun the same command to "
                            "resume")
        yield


def _in_prefect(fn, *a, **kw):
    """Run a flow with one shared Prefect API for this process and its dask workers."""
    from flows.runtime import prefect_api

    with prefect_api() as url:
        log.info("Prefect API: %s", url)
        if _VERBOSE[0] > 0:  # -v: the log lines are the display
            return fn(*a, **kw)
        from flows.progress import TerminalProgress

        with TerminalProgress():  # tomograms and stages done, time left (a terminal only)
            return fn(*a, **kw)


# --------------------------------------------------------------------------- commands
def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import SynthConfig, generate_campaign, hard_config

    if args.preset == "hard":
        cfg = hard_config(**({} if args.voxel_size is None else {"voxel_size_A": args.voxel_size}))
    else:
        cfg = SynthConfig()
        if args.voxel_size is not None:
            cfg = replace(cfg, voxel_size_A=args.voxel_size)
    if args.shape:
        cfg = replace(cfg, shape_zyx=tuple(args.shape))
    manifest = generate_campaign(Path(args.out), n_tomos=args.n_tomos, seed=args.seed, cfg=cfg,
                                 n_train=args.n_train, n_val=args.n_val,
                                 angles=not args.no_angles)
    print(manifest)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .manifest import read_manifest
    from .pipeline import convert_entry, validate_entries
    from .preflight import store_location

    cfg = _base_config(args).with_overrides("convert", chunk=args.chunk)
    entries = read_manifest(args.manifest)
    validate_entries(entries)
    store = store_location(args.store)
    with _writing((store, "store")):
        if args.sequential:
            for e in entries:
                ids = convert_entry(e, store, cfg.convert)
                log.info("%s: %d membranes", e.name, len(ids))
            return 0
        from flows.convert import convert_campaign

        ok, bad = _in_prefect(convert_campaign, args.manifest, str(store), cfg,
                              _cluster_spec(args))
    for name, msg in bad.items():
        print(f"FAILED {name}: {msg}", file=sys.stderr)
    return EXIT_PARTIAL if bad else 0


def _train_config(args: argparse.Namespace):
    cfg = _base_config(args)
    cfg = cfg.with_overrides("labels", template=args.template, max_distance=args.max_distance,
                             max_membranes=args.max_membranes,
                             ellipsoid_radii_zyx=tuple(args.ellipsoid_radii)
                             if args.ellipsoid_radii else None)
    cfg = cfg.with_overrides("train", lr=args.lr, weight_decay=args.weight_decay,
                             max_epochs=args.epochs, batch_size=args.batch_size,
                             patience=args.patience, device=args.device, seed=args.seed,
                             channels=args.channels, members=args.members)
    cfg = cfg.with_overrides("inference", rotations=args.rotations, precision=args.precision)
    if args.particle_diameter:
        from .clustering import ClusterConfig

        cc = ClusterConfig.from_particle_size(args.particle_diameter)
        cfg = replace(cfg, cluster=cc)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from flows.train import split_training

    from .manifest import read_manifest
    from .pipeline import validate_entries

    cfg = _train_config(args)
    train, val = split_training(read_manifest(args.manifest), args.manifest)
    validate_entries([*train, *val])  # bad input fails here, before any work
    _check_training_inputs([*train, *val], cfg)
    # the model directory holds the model only: the training store goes beside it
    out, store_path = _outputs(args.out, args.store, training_store)
    store = str(store_path)
    t0 = time.time()
    with _writing((out, "folder"), (store_path, "store")):
        if args.sequential:
            metrics = _train_sequential(args.manifest, str(out), store, cfg)
        else:
            from flows.train import train_campaign

            metrics = _in_prefect(train_campaign, args.manifest, str(out), store, cfg,
                                  _cluster_spec(args))
    print(f"model: {out}  best epoch {metrics.get('best_epoch')}  "
          f"val loss {metrics.get('best_val_loss', float('nan')):.4f}  "
          f"({time.time() - t0:.0f} s)")
    print(_picking_line(metrics))
    return 0


def _picking_line(metrics: dict) -> str:
    """What ``train`` learnt about picking: the calibrated threshold and the pick height (one
    line per class for a multi-class model)."""
    if metrics.get("classes"):
        return "\n".join(f"{name}: {_picking_line(m)}" for name, m in metrics["classes"].items())
    cal = metrics.get("calibration") or {}
    height = f"picks {metrics.get('pick_height', 0.0):.2f} voxels off the face"
    if cal.get("score_threshold") is None:
        return (f"score threshold not calibrated ({cal.get('annotated', 0)} annotated particles "
                f"on the validation rows; a val row calibrates it); {height}")
    return (f"score threshold {cal['score_threshold']:.2f} (bandwidth x{cal['bandwidth_scale']:g}):"
            f" validation F1 {cal['f1']:.3f} (P {cal['precision']:.3f}, R {cal['recall']:.3f}, "
            f"{cal['annotated']} annotated particles); {height}")


def _check_training_inputs(rows, cfg) -> None:
    """STARs of the training rows (columns, rlnTomoName) and the template, before any work."""
    from .preflight import check_particle_tables, check_template

    check_particle_tables(rows, training=True)
    check_template(cfg.labels.template)
    for template in cfg.labels.class_templates:
        check_template(template or None)


def _outputs(out_arg: str, store_arg: str | None, default_store=None) -> tuple[Path, Path]:
    """The output folder (created, writable) and the store (default ``<out>/campaign.zarr``,
    or ``default_store(out)``)."""
    from .preflight import output_dir, store_location

    out = output_dir(out_arg, "--out folder")
    store = store_location(store_arg or (default_store(out) if default_store
                                         else out / "campaign.zarr"))
    return out, store


def training_store(model_dir: Path) -> Path:
    """Default store of ``train``: ``<MODEL_DIR>.train.zarr`` beside the model directory (the
    converted tomograms and geometry, kept so that a rerun resumes; not part of the model)."""
    model_dir = Path(model_dir).absolute()
    return model_dir.with_name(f"{model_dir.name}.train.zarr")


def _train_sequential(manifest: str, model_dir: str, store: str, cfg) -> dict:
    from flows.train import split_training

    from . import pipeline
    from .manifest import read_manifest

    train, val = split_training(read_manifest(manifest), manifest)
    pipeline.validate_entries([*train, *val])
    pipeline.prepare_sequential([*train, *val], store, cfg)
    from .training import log_epoch

    return pipeline.fit_model(store, train, val, cfg, model_dir, log_epoch)


def _predict_config(args: argparse.Namespace):
    from . import pipeline

    cfg = pipeline.model_pipeline_config(args.model)
    if args.config:
        from .config import PipelineConfig

        # the file's values on top of the model's: what it does not set (the geometry the
        # model was trained with, its calibrated threshold and pick height) is kept
        cfg = PipelineConfig.from_toml(args.config, base=cfg)
    cfg = cfg.with_overrides("cluster", score_threshold=args.threshold)
    if args.threshold is not None:  # --threshold: one threshold for every class
        cfg = cfg.with_overrides("cluster", class_score_thresholds=())
    cfg = cfg.with_overrides("inference", device=args.device, batch_size=args.batch_size,
                             rotations=args.rotations, precision=args.precision)
    for key in ("refine_margin", "screen"):  # given (None: off)
        if hasattr(args, key):
            cfg = replace(cfg, inference=replace(cfg.inference, **{key: getattr(args, key)}))
    return cfg


def _voxels_or_off(text: str, what: str, zero: bool) -> float | None:
    """Voxels (>= 0 with ``zero``, else > 0), or ``off`` (None)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected voxels or 'off', got {text!r}") from None
    if not (value >= 0 if zero else value > 0):
        raise argparse.ArgumentTypeError(
            f"{what} must be {'>=' if zero else '>'} 0 voxels, got {text}")
    return value


def _refine_margin(text: str) -> float | None:
    """``--refine-margin``: voxels >= 0, or ``off`` (None)."""
    return _voxels_or_off(text, "margin", zero=True)


def _screen(text: str) -> float | None:
    """``--screen``: a cell of voxels > 0, or ``off`` (None)."""
    return _voxels_or_off(text, "screen cell", zero=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from . import pipeline
    from .manifest import read_manifest
    from .preflight import check_model, check_particle_tables

    # every input and output is checked here, before any work (exit 2, the file named)
    entries = read_manifest(args.manifest)
    check_model(args.model, entries)  # weights' SHA-256, voxel size of every row
    check_particle_tables(entries)
    cfg = _predict_config(args)
    out, store_path = _outputs(args.out, args.store)
    store = str(store_path)
    t0 = time.time()
    with _writing((out, "folder"), (store_path, "store")):
        if args.sequential:
            summaries = pipeline.predict_sequential(entries, store, args.model, out, cfg)
            failures: dict[str, str] = {}
            total = sum(s["particles"] for s in summaries)
        else:
            from flows.predict import predict_campaign

            result = _in_prefect(predict_campaign, args.manifest, args.model, str(out), store,
                                 cfg, _cluster_spec(args), _schedule(args))
            failures = result.failures
            total = sum(s["particles"] for s in result.summaries.values())
    for name, msg in failures.items():
        print(f"FAILED {name}: {msg}", file=sys.stderr)
    print(f"{total} particles written to {out} ({time.time() - t0:.0f} s)")
    return EXIT_PARTIAL if failures else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import pipeline
    from .manifest import read_manifest
    from .preflight import check_model, check_particle_tables

    entries = read_manifest(args.manifest)
    rows = [e for e in entries if e.split in args.rows and e.particles is not None]
    if not rows:
        from .errors import InputError

        raise InputError(args.manifest, f"no annotated rows with split {'/'.join(args.rows)} "
                                        "to calibrate on")
    # before any work: the model (integrity, voxel size of every row) and the rows' STARs
    check_model(args.model, rows)
    check_particle_tables(rows, training=True)
    model = Path(args.model).absolute()
    store = args.store or str(model.with_name(f"{model.name}.calibration.zarr"))
    metrics = pipeline.calibrate_model(store, rows, args.model, args.device or "auto")
    print(f"calibrated {args.model} on {len(rows)} rows ({metrics['points']} points): "
          + _picking_line(metrics))
    return 0


def cmd_import_v1(args: argparse.Namespace) -> int:
    from .v1 import import_v1

    info = import_v1(args.ckpt, args.out, voxel_size_A=args.voxel_size,
                     membrane_contrast=args.membrane_contrast)
    hp = info["hyper_parameters"]
    print(f"imported MemBrain v1 model {args.ckpt} -> {info['out']}: cube {info['cube_size']}^3, "
          f"{info['channels']} channels, {args.voxel_size:g} Å/voxel, epoch {info['epoch']}, "
          f"part_dists {hp.get('part_dists') if isinstance(hp, dict) else '?'}; "
          f"inert placeholders for {', '.join(info['placeholders']) or 'nothing'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_campaign, format_table

    per_tomo, overall = evaluate_campaign(args.pred, args.gt, args.radius, args.symmetry)
    print(format_table(per_tomo, overall))
    if overall.get("classes"):
        import pandas as pd

        print("\nper class")
        print(format_table(pd.DataFrame([{"tomogram": k, **m}
                                         for k, m in overall["classes"].items()])))
    if args.json:
        data = {"overall": overall, "per_tomogram": json.loads(per_tomo.to_json(orient="records")),
                "radius": args.radius, "symmetry": args.symmetry}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    out = _check_campaign(args.manifest, args.out, cfg, args.model)
    from flows.campaign import run_campaign

    with _writing((out, "folder"), (out / "campaign.zarr", "store")):
        summary = _in_prefect(run_campaign, args.manifest, str(out), cfg, args.model,
                              _cluster_spec(args), args.symmetry, _schedule(args))
    _print_evaluation(summary)
    return EXIT_PARTIAL if summary["failures"] else 0


def _check_campaign(manifest: str, out_arg: str, cfg, model: str | None) -> Path:
    """A campaign's inputs (before Prefect starts) and its output folder."""
    from flows.train import split_training

    from .manifest import read_manifest
    from .pipeline import validate_entries
    from .preflight import check_model, check_particle_tables

    entries = read_manifest(manifest)
    validate_entries(entries)
    tests = [e for e in entries if e.split == "test"]
    if model is None:
        train, val = split_training(entries, manifest)
        _check_training_inputs([*train, *val], cfg)
    else:
        check_model(model, tests)
    check_particle_tables(tests)
    out, _ = _outputs(out_arg, None)
    return out


def _print_evaluation(summary: dict) -> None:
    ev = summary.get("evaluation")
    if not ev:
        return
    o = ev["overall"]
    print(f"F1 {o['f1']:.3f} (precision {o['precision']:.3f}, recall {o['recall']:.3f}); "
          f"one-to-one F1 {o['f1_matched']:.3f}; "
          f"in-plane error {o['angle_mean'] if o['angle_mean'] is not None else float('nan'):.1f} deg "
          f"mean over {o['n_angles']} matched particles (C{ev['symmetry']})")


def cmd_demo(args: argparse.Namespace) -> int:
    from .synth import generate_campaign

    out = Path(args.out)
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        if args.n_val < 0 or args.n_tomos < args.n_val + 2:
            from .errors import InputError

            raise InputError(out, f"--n-tomos {args.n_tomos} --n-val {args.n_val}: need one "
                                  "training tomogram, n-val >= 0 validation tomograms and at "
                                  "least one to test")
        print(f"synthetic campaign: {args.n_tomos} tomograms (1 for training, {args.n_val} for "
              f"validation) in {out / 'data'}")
        generate_campaign(out / "data", n_tomos=args.n_tomos, seed=args.seed or 0, n_train=1,
                          n_val=args.n_val)
    ns = argparse.Namespace(**vars(args))
    ns.template = str(out / "data" / "template.mrc")
    ns.manifest = str(manifest)
    cfg = _train_config(ns)  # training: TrainConfig's defaults unless given
    cfg = cfg.with_overrides("inference", rotations=args.rotations or DEMO_ROTATIONS)
    run = _check_campaign(str(manifest), str(out / "run"), cfg, None)
    from flows.campaign import run_campaign

    t0 = time.time()
    with _writing((run, "folder"), (run / "campaign.zarr", "store")):
        summary = _in_prefect(run_campaign, str(manifest), str(run), cfg, None,
                              _cluster_spec(args), 2)
    print(f"demo finished in {time.time() - t0:.0f} s; predictions in {summary['predictions']}")
    _print_evaluation(summary)
    return EXIT_PARTIAL if summary["failures"] else 0


def cmd_copick_manifest(args: argparse.Namespace) -> int:
    from .copick_project import build_manifest

    out = build_manifest(args.config, args.out, args.voxel_spacing, args.tomo_type,
                         args.segmentation, args.seg_user, args.seg_session, args.picks,
                         args.user, args.session, args.val_runs or (), args.runs)
    print(f"manifest written: {out}")
    return 0


def cmd_copick_export(args: argparse.Namespace) -> int:
    from .copick_project import export_predictions

    paths = export_predictions(args.config, args.pred, args.object, args.user, args.session)
    print(f"{len(paths)} copick picks files written under user {args.user!r}, session "
          f"{args.session!r}")
    return 0


# --------------------------------------------------------------------------- parser
def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--template", default=None,
                   help="particle template MRC (Mahalanobis labels); default Euclidean")
    g.add_argument("--ellipsoid-radii", type=float, nargs=3, metavar=("RZ", "RY", "RX"),
                   help="particle semi-axes in voxels (normal, short, long) instead of a template")
    g.add_argument("--max-distance", type=float, default=None,
                   help="label clip distance, voxels (default 7)")
    g.add_argument("--max-membranes", type=int, default=None,
                   help="train on at most N annotated membranes (1: the paper's one-membrane setting)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=None, help="default 1e-3")
    g.add_argument("--epochs", type=int, default=None, help="maximum epochs (early stopping)")
    g.add_argument("--patience", type=int, default=None, help="early-stopping patience, epochs")
    g.add_argument("--batch-size", type=int, default=None, help="default 256 (paper: 1024)")
    g.add_argument("--channels", type=int, default=None,
                   help="CNN width (MemBrain v1: 32; default 16, 5x faster on CPU)")
    g.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--members", type=int, default=None,
                   help="train this many networks (seeds seed, seed+1, ...) and average them: "
                        "steadier picks from few annotations at x members the training time; "
                        "prediction costs the same (each member scores its own quarter turn of "
                        "the cube); default 1; 4 for one membrane of a few dozen particles or "
                        "fewer, or on a GPU")
    _add_scoring_options(g)
    g.add_argument("--particle-diameter", type=float, default=None,
                   help="expected particle size in voxels; sets the clustering defaults")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="membrain-dist",
        description="Find membrane-embedded particles in cryo-ET tomograms (MemBrain, "
                    "distributed over dask, orchestrated by Prefect).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv: dask and Prefect too)")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic campaign: train, predict, evaluate (F1, angles)")
    p.add_argument("--out", default="membrain-demo", help="working folder (default ./membrain-demo)")
    p.add_argument("--n-tomos", type=int, default=7,
                   help="tomograms (default 7: 1 trains, --n-val validate, the rest are tested)")
    p.add_argument("--n-val", type=int, default=1,
                   help="annotated validation tomograms (default 1): the training stops on their "
                        "loss and the score threshold is chosen on their picking F1; 0 = a part "
                        "of the training tomogram's membranes instead")
    _add_train_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_demo, config=None, store=None, model=None, particle_diameter=None)

    p = sub.add_parser("synth", help="write a synthetic campaign (MRC, STAR, manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-tomos", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1)
    p.add_argument("--n-val", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None)
    p.add_argument("--preset", choices=("default", "hard"), default="default",
                   help="hard: CTF, coloured noise at SNR 0.3, damaged segmentations, grana "
                        "stacks, face-on/edge-on sheets, real PSII/b6f maps (synth.hard_config)")
    p.add_argument("--voxel-size", type=float, default=None,
                   help="voxel size in Å (hard preset: protein sizes follow it)")
    p.add_argument("--no-angles", action="store_true",
                   help="per-tomogram STARs without angles (ground_truth.star keeps them)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="MRC tomograms + segmentations -> chunked Zarr store")
    p.add_argument("--manifest", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--chunk", type=int, default=None, help="chunk edge in voxels (default 128)")
    p.add_argument("--config", default=None)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train the scoring CNN on annotated tomograms")
    p.add_argument("--manifest", required=True, help="CSV; rows with split train (and val)")
    p.add_argument("--out", required=True, help="model directory (created)")
    _add_config_options(p)
    _add_train_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="pick particles: <out>/<name>.star per manifest row")
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--out", required=True, help="prediction directory (created)")
    _add_config_options(p)
    p.add_argument("--threshold", type=float, default=None,
                   help="keep points with predicted distance below this, voxels (default 4)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch size")
    _add_scoring_options(p)
    p.add_argument("--refine-margin", type=_refine_margin, default=argparse.SUPPRESS,
                   metavar="VOXELS|off",
                   help="turn cascade: with several rotations, only points whose first pass "
                        "scores below the threshold plus this margin get the other turns "
                        "(default 1.0: the same picks at 31-38 %% of the passes on the hard "
                        "phantom); off: every point gets every turn")
    p.add_argument("--screen", type=_screen, default=argparse.SUPPRESS, metavar="VOXELS|off",
                   help="spatial screen: score one point per cell of this size (and side) "
                        "first, then only points within it of one scoring below the threshold "
                        "plus the refine margin; the rest stay unscored (default 3: 43-48 %% "
                        "of the points scored on the hard phantom, the same F1); off: score "
                        "every point")
    _add_cluster_options(p)
    _add_schedule_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("import-v1", help="import MemBrain v1's pretrained checkpoint (.ckpt) "
                                         "as a model directory, without executing its pickle")
    p.add_argument("ckpt", help="PyTorch Lightning checkpoint of MemBrain v1")
    p.add_argument("--out", required=True, help="model directory to write (created)")
    p.add_argument("--voxel-size", type=float, default=13.68,
                   help="Å/voxel of the data the model was trained on (default 13.68: v1's "
                        "shipped PSII model, bin 4); predict refuses tomograms 5%% off it")
    p.add_argument("--membrane-contrast", choices=("dark", "bright"), default="dark",
                   help="how membranes looked in v1's training tomograms (default dark: v1 fed "
                        "tomograms as reconstructed); our cubes have them bright")
    p.set_defaults(func=cmd_import_v1)

    p = sub.add_parser("calibrate", help="choose a model's score threshold (and bandwidth, "
                                         "pick height) on annotated rows by clustering F1")
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True, help="model directory (trained or imported)")
    p.add_argument("--rows", nargs="+", choices=("train", "val", "test"), default=["val"],
                   help="splits whose annotated rows calibrate (default val)")
    p.add_argument("--store", default=None,
                   help="campaign Zarr store (default: <model>.calibration.zarr beside the "
                        "model directory)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="precision / recall / F1 and in-plane angle error")
    p.add_argument("--pred", required=True, help="prediction folder or STAR")
    p.add_argument("--gt", required=True, help="ground-truth STAR, folder or manifest")
    p.add_argument("--radius", type=float, default=4.5, help="hit radius, voxels (paper 4.5)")
    p.add_argument("--symmetry", type=int, default=1, help="in-plane symmetry order (PSII: 2)")
    p.add_argument("--json", default=None, help="also write the figures as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("campaign", help="train on the train rows, predict and evaluate the rest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="use this model instead of training")
    p.add_argument("--symmetry", type=int, default=1)
    _add_config_options(p)
    _add_train_options(p)
    _add_cluster_options(p)
    _add_schedule_options(p)
    p.set_defaults(func=cmd_campaign)

    p = sub.add_parser("copick-manifest", help="a campaign manifest from a copick project "
                                               "(tomograms, membrane segmentations, picks)")
    p.add_argument("--config", required=True, help="copick config JSON (local roots)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--voxel-spacing", type=float, required=True, help="Å")
    p.add_argument("--tomo-type", required=True, help="e.g. wbp, denoised")
    p.add_argument("--segmentation", required=True, help="membrane segmentation name")
    p.add_argument("--seg-user", default=None)
    p.add_argument("--seg-session", default=None)
    p.add_argument("--picks", default=None, help="pickable object whose picks annotate (train)")
    p.add_argument("--user", default=None, help="picks' user id")
    p.add_argument("--session", default=None, help="picks' session id")
    p.add_argument("--val-runs", nargs="*", default=None, help="annotated runs to validate on")
    p.add_argument("--runs", nargs="*", default=None, help="only these runs (default all)")
    p.set_defaults(func=cmd_copick_manifest)

    p = sub.add_parser("copick-export", help="write predict's picks into a copick project")
    p.add_argument("--config", required=True, help="copick config JSON (local roots)")
    p.add_argument("--pred", required=True, help="prediction folder (<name>.star per run)")
    p.add_argument("--object", default=None,
                   help="pickable object of the picks (default: each class's name, for a model "
                        "with named classes; needed for single-class picks)")
    p.add_argument("--user", default="membrain", help="user id (default membrain)")
    p.add_argument("--session", default="0", help="session id (default 0: a tool's picks)")
    p.set_defaults(func=cmd_copick_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from . import interrupts
    from .errors import InputError

    previous = interrupts.install()
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"membrain-dist: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun to resume", file=sys.stderr)
        interrupts.reap_children()
        return 130
    except BaseException:
        code = interrupts.stopping()  # Interrupted, or what a flow made of the signal
        if code is None:
            raise
        interrupts.reap_children()
        return code
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
