"""Peak memory of MRC -> Zarr conversion: streaming ``convert_tomogram`` vs a naive copy.

Writes a float32 tomogram (default 512 x 1024 x 1024 = 2 GiB) and an int8 segmentation with
a few membranes (slab by slab through ``mrcfile.new_mmap``), then runs, each in a fresh
child process, (a) ``membrain_dist.convert.convert_tomogram`` and (b) a reference that
loads the whole MRC (``np.asarray``) and writes it to Zarr. The child's peak RSS is its
own high-water mark (``VmHWM`` of /proc/self/status; ``getrusage`` ``ru_maxrss`` where that
is missing), cross-checked by psutil polling from the parent. The data are generated in
another child so the parent stays small (``ru_maxrss`` survives fork + exec on Linux).

Usage::

    python benchmarks/convert_memory.py                      # 512x1024x1024
    python benchmarks/convert_memory.py --size 128x256x256   # quick run
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
log = logging.getLogger("convert_memory")


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("size is ZxYxX, e.g. 512x1024x1024")
    return parts[0], parts[1], parts[2]


def make_data(folder: Path, shape: tuple[int, int, int], voxel_size_A: float = 10.0,
              slab: int = 32) -> tuple[Path, Path]:
    """Synthetic tomogram (noise, darker membranes) and segmentation: two spherical shells
    and a plane, written slab by slab so the generator stays small."""
    import mrcfile

    folder.mkdir(parents=True, exist_ok=True)
    tag = "x".join(map(str, shape))
    tpath, spath = folder / f"tomo_{tag}.mrc", folder / f"seg_{tag}.mrc"
    if tpath.exists() and spath.exists():
        return tpath, spath
    nz, ny, nx = shape
    spheres = [((nz * 0.5, ny * 0.3, nx * 0.3), min(shape) * 0.25),
               ((nz * 0.5, ny * 0.7, nx * 0.65), min(shape) * 0.2)]
    plane_z = int(nz * 0.15)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    with mrcfile.new_mmap(tpath, shape, mrc_mode=2, overwrite=True) as tm, \
            mrcfile.new_mmap(spath, shape, mrc_mode=0, overwrite=True) as sm:
        for z0 in range(0, nz, slab):
            z1 = min(z0 + slab, nz)
            t = rng.standard_normal((z1 - z0, ny, nx), dtype=np.float32)
            s = np.zeros((z1 - z0, ny, nx), dtype=np.int8)
            for k, z in enumerate(range(z0, z1)):
                m = np.zeros((ny, nx), dtype=bool)
                for (cz, cy, cx), r in spheres:
                    d = np.sqrt((z - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2)
                    m |= np.abs(d - r) < 1.5
                if abs(z - plane_z) <= 1:
                    m[:, :] = True
                s[k][m] = 1
            t[s > 0] -= 2.0
            tm.data[z0:z1] = t
            sm.data[z0:z1] = s
            tm.flush()
            sm.flush()
        tm.voxel_size = voxel_size_A
        sm.voxel_size = voxel_size_A
    return tpath, spath


def _child(mode: str, tpath: Path, spath: Path, out: Path, chunk: int) -> None:
    """Runs in the child process: one conversion, then prints a JSON line."""
    t0 = time.perf_counter()
    if mode == "convert":
        from membrain_dist.convert import ConvertConfig, convert_tomogram
        from membrain_dist.manifest import TomogramEntry

        logging.basicConfig(level=logging.INFO)
        entry = TomogramEntry("bench", tpath, spath, None, None, "test")
        meta = convert_tomogram(entry, out, ConvertConfig(chunk=chunk))
        extra = {"membranes": len(meta.membranes)}
    else:
        import mrcfile
        import zarr

        from membrain_dist.store import default_compressor

        with mrcfile.open(tpath, permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
        g = zarr.open_group(out, mode="w")
        a = g.create_array("0", shape=data.shape, dtype="float32", chunks=(chunk,) * 3,
                           compressors=default_compressor())
        a[:] = data
        extra = {}
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_rss_bytes": _peak_rss(), "seconds": seconds, **extra}), flush=True)


def _peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def run_child(mode: str, tpath: Path, spath: Path, out: Path, chunk: int) -> dict:
    """Start the child, poll its RSS, return its report plus the polled peak."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--tomogram",
           str(tpath), "--segmentation", str(spath), "--out", str(out), "--chunk", str(chunk)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    polled = 0
    while proc.poll() is None:
        try:
            polled = max(polled, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{stderr[-4000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    report["polled_peak_rss_bytes"] = polled
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=_shape, default=(512, 1024, 1024), help="ZxYxX voxels")
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "convert_memory.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated MRC files")
    ap.add_argument("--child", choices=["convert", "reference", "generate"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--tomogram", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--segmentation", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "generate":
        make_data(args.data_dir, args.size)
        return
    if args.child:
        _child(args.child, args.tomogram, args.segmentation, args.out, args.chunk)
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "generate",
                    "--size", "x".join(map(str, args.size)), "--data-dir", str(args.data_dir)],
                   check=True)
    tag = "x".join(map(str, args.size))
    tpath, spath = args.data_dir / f"tomo_{tag}.mrc", args.data_dir / f"seg_{tag}.mrc"
    log.info("data ready in %.1f s: %s (%.2f GB)", time.perf_counter() - t0, tpath,
             tpath.stat().st_size / 1e9)
    try:
        conv = run_child("convert", tpath, spath, args.data_dir / "convert.zarr", args.chunk)
        ref = run_child("reference", tpath, spath, args.data_dir / "reference.zarr", args.chunk)
    finally:
        shutil.rmtree(args.data_dir / "convert.zarr", ignore_errors=True)
        shutil.rmtree(args.data_dir / "reference.zarr", ignore_errors=True)
        if not args.keep:
            tpath.unlink(missing_ok=True)
            spath.unlink(missing_ok=True)
    nbytes = int(np.prod(args.size)) * 4
    result = {
        "shape_zyx": list(args.size),
        "chunk": args.chunk,
        "tomogram_bytes": nbytes,
        "peak_rss_bytes": conv["peak_rss_bytes"],
        "polled_peak_rss_bytes": conv["polled_peak_rss_bytes"],
        "seconds": conv["seconds"],
        "membranes": conv.get("membranes"),
        "reference_peak_rss_bytes": ref["peak_rss_bytes"],
        "reference_polled_peak_rss_bytes": ref["polled_peak_rss_bytes"],
        "reference_seconds": ref["seconds"],
        "target_peak_rss_bytes": 10**9,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    print(f"\ntomogram {args.size} float32 = {nbytes / gb:.2f} GB")
    print(f"{'run':<12}{'peak RSS (GB)':>15}{'polled (GB)':>13}{'seconds':>10}")
    print(f"{'convert':<12}{conv['peak_rss_bytes'] / gb:>15.3f}"
          f"{conv['polled_peak_rss_bytes'] / gb:>13.3f}{conv['seconds']:>10.1f}")
    print(f"{'reference':<12}{ref['peak_rss_bytes'] / gb:>15.3f}"
          f"{ref['polled_peak_rss_bytes'] / gb:>13.3f}{ref['seconds']:>10.1f}")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
