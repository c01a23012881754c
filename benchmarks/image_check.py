"""Time of the image check that runs when a split is read (``checked_image_dataset``), on official-size folders.

Empty files stand in for the images (only names are looked up): COCO's ``train2014/`` (82,783 files) and
``val2014/`` (40,504), of which the Karpathy training split names 113,287 with 5 captions each (566,435 samples, one
per caption, as ``COCOCaptionDataModule`` serves them); and ImageNet's flat ``val/`` (50,000 files, one sample each).
Each check is timed against the per-file alternative (``os.path.isfile`` on every distinct image), best of
``--repeats`` runs, in one process; the page cache is warm (the files were just written), as on a second run.

Usage::

    python benchmarks/image_check.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _results import publish_section

from ecoflap_pl.datamodules.base import Sample, checked_image_dataset

SECTION = "## Image check when a split is read"
COCO_TRAIN, COCO_VAL, KARPATHY_TRAIN, CAPTIONS = 82_783, 40_504, 113_287, 5
IMAGENET_VAL = 50_000


def write_empty(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).touch()


def coco(root: Path) -> list[Sample]:
    """Karpathy training samples (one per caption) over empty COCO 2014 folders."""
    train = [f"COCO_train2014_{i:012d}.jpg" for i in range(COCO_TRAIN)]
    val = [f"COCO_val2014_{i:012d}.jpg" for i in range(COCO_VAL)]
    write_empty(root / "train2014", train)
    write_empty(root / "val2014", val)
    images = [root / "train2014" / n for n in train] + [root / "val2014" / n for n in val]
    return [
        Sample((str(path),), {"text": f"caption {k}"}, f"image_id {i} (coco_karpathy_train.json, entry {i})")
        for i, path in enumerate(images[:KARPATHY_TRAIN])
        for k in range(CAPTIONS)
    ]


def imagenet(root: Path) -> list[Sample]:
    """Flat ImageNet validation samples over an empty ``val/``."""
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(IMAGENET_VAL)]
    write_empty(root / "val", names)
    return [Sample((str(root / "val" / n),), {"label": 0}, f"ImageId {n} (line {i + 2})") for i, n in enumerate(names)]


def best(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def per_file(samples: list[Sample]) -> None:
    """The alternative: one ``stat`` per distinct image."""
    missing = [path for path in dict.fromkeys(p for s in samples for p in s.images) if not os.path.isfile(path)]
    assert not missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="folder to write the empty files in (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as folder:
        for name, make in (("COCO Karpathy train", coco), ("ImageNet flat val", imagenet)):
            samples = make(Path(folder) / name.replace(" ", "_"))
            images = len({p for s in samples for p in s.images})
            checked = best(lambda s=samples: checked_image_dataset(s, "image_root", "hint"), args.repeats)
            stat = best(lambda s=samples: per_file(s), args.repeats)
            rows.append((name, images, len(samples), checked, stat))
            print(f"{name}: {images:,} images, {len(samples):,} samples: {checked:.3f} s (per-file stat {stat:.3f} s)")
    lines = [
        SECTION,
        "",
        "`python benchmarks/image_check.py` (empty files standing in for the images, warm page cache, best of "
        f"{args.repeats}): the check `_read` runs on every split it reads (one `os.scandir` per image folder, then a "
        "set lookup per image), against a `stat` per image. "
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after the run (shared with other jobs), local disk.",
        "",
        "| split | images | samples | check when read | per-file stat | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, images, samples_count, checked, stat in rows:
        lines.append(
            f"| {name} | {images:,} | {samples_count:,} | {checked:.2f} s | {stat:.2f} s | {stat / checked:.1f}x |"
        )
    section = "\n".join(lines) + "\n"
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
