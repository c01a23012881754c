"""`build_demo_data`: sample the scenes, render them and write every dataset, under a cached, atomic build."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ecoflap_pl.demo.cache import cached_build, read_marker
from ecoflap_pl.demo.data.coco import coco_file, write_coco
from ecoflap_pl.demo.data.files import Progress, write_bytes, write_json
from ecoflap_pl.demo.data.imagenet import write_imagenet
from ecoflap_pl.demo.data.nlvr2 import nlvr2_image, write_nlvr2
from ecoflap_pl.demo.data.render import digit_glyphs, encode_image, render_scene
from ecoflap_pl.demo.data.scenes import CLASS_NAMES, COLOURS, Scene, sample_scene, seeded_rng, split_pools
from ecoflap_pl.demo.data.vqav2 import write_vqav2

log = logging.getLogger(__name__)

#: Bumped whenever the generated content changes, so that older caches are rebuilt.
DATA_VERSION = 3
MARKER = "ecoflap_demo.json"


@dataclass(frozen=True)
class DemoPaths:
    """Where `build_demo_data` put each dataset: `coco` ... `imagenet_flat` are DataModules' `data_dir`.

    Attributes:
        root: The directory passed to `build_demo_data`.
        coco: COCO captions (official and Karpathy annotations, 2014 image folders).
        vqav2: VQAv2 questions/annotations; the same directory as `coco` (they share the images).
        nlvr2: NLVR2 JSON-lines files and image folders.
        imagenet: ImageNet layout with per-wnid train and val folders.
        imagenet_flat: ImageNet layout with a flat val folder and `LOC_val_solution.csv`.
        corpus: A text file with every training text, one per line.
        scenes: A JSON file with the ground truth of every picture.
    """

    root: Path
    coco: Path
    vqav2: Path
    nlvr2: Path
    imagenet: Path
    imagenet_flat: Path
    corpus: Path
    scenes: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        """The paths `build_demo_data(root)` writes."""
        return cls(
            root=root,
            coco=root / "coco",
            vqav2=root / "coco",
            nlvr2=root / "nlvr2",
            imagenet=root / "imagenet",
            imagenet_flat=root / "imagenet_flat",
            corpus=root / "corpus.txt",
            scenes=root / "scenes.json",
        )


def build_demo_data(
    root: str | os.PathLike[str],
    *,
    train_images: int = 2000,
    val_images: int = 300,
    test_images: int = 300,
    imagenet_train_images: int = 2000,
    imagenet_val_images: int = 500,
    questions_per_image: int = 3,
    image_size: int = 48,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DemoPaths:
    """Write the demo datasets under `root` (see :mod:`ecoflap_pl.demo.data` for the layout), or reuse them.

    The build goes to a temporary sibling directory that is renamed to `root` when complete, so `root` is never
    half-written. A marker file records the parameters: a later call with the same parameters returns at once;
    different parameters rebuild. The same seed gives byte-identical files.

    Args:
        root: Output directory. It must not exist, be empty, or hold an earlier demo build.
        train_images: Train scenes (COCO train2014, VQAv2 train, NLVR2 train pairs = half of them).
        val_images: Val scenes (Karpathy val; VQAv2 val2014 together with the test scenes; NLVR2 dev).
        test_images: Test scenes (Karpathy test in val2014; NLVR2 test1) and as many VQAv2 test2015 scenes.
        imagenet_train_images: Single-digit images in `imagenet/train` (balanced over the 10 classes).
        imagenet_val_images: Single-digit images in `imagenet/val` and `imagenet_flat/val`.
        questions_per_image: VQAv2 questions per scene (each of a different kind).
        image_size: Side of every (square) image in pixels. Digits sit in the cells of a 3x3 grid, one per
            cell: up to three per scene, one per ImageNet-layout image.
        seed: Seeds every random choice (digit pools, scenes, texts, human answers).
        overwrite: Rebuild even when `root` already holds a build with these parameters, and replace a
            non-empty `root` that is not a demo build.
        progress: Optional `progress(stage, done, total)` called after each image is written.

    Returns:
        The dataset directories.

    Raises:
        ValueError: A size is out of range.
        FileExistsError: `root` is a non-empty directory that is not a demo build and `overwrite` is False.
    """
    pairs = "NLVR2 needs at least one image pair per split."
    classes = "every one of the 10 classes needs an image."
    params = {
        "train_images": _check_int("train_images", train_images, 2, hint=pairs),
        "val_images": _check_int("val_images", val_images, 2, hint=pairs),
        "test_images": _check_int("test_images", test_images, 2, hint=pairs),
        "imagenet_train_images": _check_int("imagenet_train_images", imagenet_train_images, 10, hint=classes),
        "imagenet_val_images": _check_int("imagenet_val_images", imagenet_val_images, 10, hint=classes),
        "questions_per_image": _check_int(
            "questions_per_image", questions_per_image, 1, 6, hint="a scene has at least 6 kinds of question."
        ),
        "image_size": _check_int(
            "image_size", image_size, 32, 1024, hint="scenes are a 3x3 grid of digit cells; 48 suits the demo."
        ),
        "seed": _check_int("seed", seed, 0, hint="numpy seeds are non-negative integers."),
    }
    root = Path(root)
    if root.exists() and not overwrite and read_marker(root, MARKER) is None and any(root.iterdir()):
        raise FileExistsError(
            f"`root` must be empty or hold an earlier demo build, got {str(root)!r} with other files. "
            "HINT: pick another directory or pass overwrite=True to replace it."
        )

    def write(tmp: Path) -> None:
        log.info("Writing the demo data to %s", root)
        _build(DemoPaths.under(tmp), progress=progress, **params)

    cached_build(root, {"version": DATA_VERSION, "params": params}, write, marker=MARKER, rebuild=overwrite)
    return DemoPaths.under(root)


def _check_int(name: str, value: int, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}. HINT: {hint}")
    return value


def _build(
    paths: DemoPaths,
    *,
    train_images: int,
    val_images: int,
    test_images: int,
    imagenet_train_images: int,
    imagenet_val_images: int,
    questions_per_image: int,
    image_size: int,
    seed: int,
    progress: Progress | None,
) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = digit_glyphs(digits.images)
    pools = split_pools(digits.target, seed)
    sizes = {"train": train_images, "val": val_images, "test": test_images, "test2015": test_images}
    pool_of = {"train": "train", "val": "val", "test": "test", "test2015": "test"}
    scenes: dict[str, list[Scene]] = {}
    next_id = 1
    for split, count in sizes.items():
        rng = seeded_rng(seed, "scenes", split)
        scenes[split] = [sample_scene(rng, pools[pool_of[split]], next_id + i, image_size) for i in range(count)]
        next_id += count

    folders = {"train": "train2014", "val": "val2014", "test": "val2014", "test2015": "test2015"}
    nlvr2_split = {"train": "train", "val": "dev", "test": "test1"}
    for split, split_scenes in scenes.items():
        rng = seeded_rng(seed, "render", split)
        for i, scene in enumerate(split_scenes):
            image = render_scene(scene, glyphs, image_size, rng)
            write_bytes(paths.coco / coco_file(folders[split], scene.image_id), encode_image(image, "JPEG"))
            if split in nlvr2_split and i < 2 * (len(split_scenes) // 2):
                write_bytes(paths.nlvr2 / nlvr2_image(nlvr2_split[split], i // 2, i % 2), encode_image(image, "PNG"))
            if progress is not None:
                progress(f"scenes {folders[split]}", i + 1, len(split_scenes))

    corpus: list[str] = []
    corpus += write_coco(paths.coco, scenes, seed, image_size)
    corpus += write_vqav2(paths.vqav2, scenes, seed, questions_per_image)
    corpus += write_nlvr2(paths.nlvr2, scenes, seed, nlvr2_split)
    imagenet = write_imagenet(
        paths.imagenet,
        paths.imagenet_flat,
        glyphs,
        pools,
        seed,
        image_size,
        imagenet_train_images,
        imagenet_val_images,
        progress,
    )
    corpus += list(CLASS_NAMES)
    paths.corpus.write_text("".join(f"{line}\n" for line in corpus))
    write_json(
        paths.scenes,
        {
            "colours": COLOURS,
            "splits": {split: [asdict(scene) for scene in split_scenes] for split, split_scenes in scenes.items()},
            "imagenet": imagenet,
        },
    )
