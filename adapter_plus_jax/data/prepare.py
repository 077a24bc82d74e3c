"""Download and prepare the TFDS datasets of VTAB-1k and FGVC.

    apj data prepare --tasks all --data-dir DIR
    apj data demo-images --out digits   # the demo's test images as PNG
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from adapter_plus_jax.data import fgvc
from adapter_plus_jax.data.tfds_io import (
    ManualDownloadError,
    TFDSVersionError,
    _BuilderSpec,
    tfds_builder,
)
from adapter_plus_jax.data.vtab import TASKS

_PIP_NAMES = {"cv2": "opencv-python-headless", "scipy": "scipy", "h5py": "h5py"}


def manual_dir_for(builder, manual_dir: str | Path | None = None) -> Path:
    """`manual_dir`, or TFDS's default `<data_dir>/downloads/manual`."""
    if manual_dir is not None:
        return Path(manual_dir)
    return Path(builder.data_dir_root) / "downloads" / "manual"


def _prepare_problem(spec: _BuilderSpec, manual_dir: Path) -> str | None:
    """Why `spec` cannot be prepared now (missing manual files or pip extras), or None."""
    missing = [f for f in spec.manual_files if not (manual_dir / f).exists()]
    if missing:
        return (
            f"{spec.name}: missing in {manual_dir}: {', '.join(missing)}.\n  "
            + spec.manual.replace("MANUAL_DIR", str(manual_dir))
        )
    modules = [m for m in spec.extras if importlib.util.find_spec(m) is None]
    if modules:
        packages = " ".join(_PIP_NAMES[m] for m in modules)
        return f"{spec.name}: preparing it needs `pip install {packages}`"
    return None


def _resolve_targets(names: Iterable[str]) -> list[_BuilderSpec]:
    """Task / FGVC names ('all' = the 19 VTAB tasks, 'fgvc' = the FGVC datasets TFDS has) ->
    specs, one per TFDS builder."""
    specs: dict[str, _BuilderSpec] = {}
    for name in names:
        if name == "all":
            found = list(TASKS.values())
        elif name == "fgvc":
            found = [s for s in fgvc.FGVC.values() if s.tfds_name]
        elif name in TASKS:
            found = [TASKS[name]]
        elif name in fgvc.FGVC and fgvc.FGVC[name].tfds_name:
            found = [fgvc.FGVC[name]]
        elif name in fgvc.FGVC:
            raise ValueError(
                f"{name} has no TFDS builder; see adapter_plus_jax.data.fgvc for its layout"
            )
        else:
            known = ", ".join([*TASKS, *fgvc.FGVC])
            raise ValueError(f"unknown dataset {name!r}; known: all, fgvc, {known}")
        for spec in found:
            specs.setdefault(spec.tfds_name, spec)
    return list(specs.values())


def prepare(
    names: Iterable[str],
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
) -> None:
    """Download and prepare the TFDS datasets of `names` into `data_dir` (None: TFDS default).

    Prepared datasets are skipped. Datasets that need files TFDS cannot fetch (resisc45 and
    retinopathy are manual; sun397 and cars196 have dead URLs) are prepared only when those
    files are in `manual_dir` (default `<data_dir>/downloads/manual`); the others go on, and a
    `ManualDownloadError` at the end says exactly which file to place where.
    """
    from tqdm import tqdm  # a TFDS dependency

    problems = []
    specs = _resolve_targets(names)
    bar = tqdm(specs, desc="datasets", unit="dataset")
    for spec in bar:
        bar.set_postfix_str(spec.tfds_name)
        builder = tfds_builder(spec, data_dir)
        if builder.is_prepared():
            continue
        mdir = manual_dir_for(builder, manual_dir)
        problem = _prepare_problem(spec, mdir)
        if problem:
            problems.append(problem)
            continue
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(mdir))
        )
    if problems:
        raise ManualDownloadError("\n".join(problems))


def main(argv: Sequence[str] | None = None, prog: str = "apj data") -> int:
    """`apj data prepare` and `apj data demo-images`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Download and prepare the TFDS datasets of VTAB-1k and FGVC.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download and prepare TFDS datasets")
    prep.add_argument(
        "--tasks",
        nargs="+",
        default=["all"],
        help="VTAB task or FGVC names, 'all' (VTAB-1k) or 'fgvc'; commas also separate",
    )
    prep.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's)")
    prep.add_argument("--manual-dir", default=None, help="default: DATA_DIR/downloads/manual")
    images = sub.add_parser("demo-images", help="write demo test images as PNG files "
                            "(to try predict on)")  # fmt: skip
    images.add_argument("--out", required=True, help="the folder to write")
    images.add_argument("--count", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "demo-images":
        from adapter_plus_jax.data import demo

        paths = demo.write_test_images(args.out, args.count)
        print(f"Wrote {len(paths)} test images of the demo to {args.out} (digit_<n>_label<k>.png)")
        return 0
    names = [n for arg in args.tasks for n in arg.split(",") if n]
    try:
        prepare(names, args.data_dir, args.manual_dir)
    except (ManualDownloadError, TFDSVersionError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
