"""Tiny datasets written in exactly the official on-disk layouts (docs/data_formats.md), with 8x8 images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

# COCO image id -> official 2014 folder; Karpathy split of each image (4 is restval: training data).
COCO_IMAGES = {1: "train2014", 2: "train2014", 3: "train2014", 4: "val2014", 5: "val2014", 6: "val2014"}
KARPATHY_SPLIT = {1: "train", 2: "train", 3: "train", 4: "restval", 5: "val", 6: "test"}
FLICKR_IMAGES = {1000092795: "train", 10002456: "train", 1000268201: "val", 1000344755: "test"}
IMAGENET_WNIDS = ("n01440764", "n01443537")  # tench, goldfish


def write_image(path: Path, value: int = 0, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(path, fmt)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def edit_json(path: Path, change: Callable[[Any], object]) -> Path:
    """Apply ``change`` to the parsed JSON file at ``path`` (in place) and write it back."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    return write_json(path, data)


def captions_of(image_id: int) -> list[str]:
    return [f"picture {image_id} caption {k}" for k in range(3)]


def collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The simplest collate_fn: the list of raw samples itself."""
    return samples


def coco_image_path(image_id: int, year: int = 2014) -> str:
    folder = COCO_IMAGES[image_id].replace("2014", str(year))
    name = f"COCO_{folder}_{image_id:012d}.jpg" if year == 2014 else f"{image_id:012d}.jpg"
    return f"{folder}/{name}"


def write_coco_images(root: Path, year: int = 2014) -> None:
    for image_id in COCO_IMAGES:
        write_image(root / coco_image_path(image_id, year), image_id)


def write_coco_karpathy(root: Path) -> None:
    """LAVIS ``annotations/coco_karpathy_{train,val,test}.json`` (train: restval included, one entry per caption)."""
    train = [
        {"image": coco_image_path(i), "caption": c, "image_id": f"coco_{i}"}
        for i, split in KARPATHY_SPLIT.items()
        if split in ("train", "restval")
        for c in captions_of(i)
    ]
    write_json(root / "annotations" / "coco_karpathy_train.json", train)
    for split in ("val", "test"):
        entries = [
            {"image": coco_image_path(i), "caption": captions_of(i)} for i, s in KARPATHY_SPLIT.items() if s == split
        ]
        write_json(root / "annotations" / f"coco_karpathy_{split}.json", entries)


def karpathy_original(images: dict[int, str], filepath: Any, name: Any, id_key: str | None) -> dict[str, Any]:
    entries = []
    for index, (image_id, split) in enumerate(images.items()):
        entry = {
            "filename": name(image_id),
            "imgid": index,
            "split": split,
            "sentids": [3 * index + k for k in range(3)],
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": index} for c in captions_of(image_id)],
        }
        if filepath is not None:
            entry["filepath"] = filepath(image_id)
        if id_key:
            entry[id_key] = image_id
        entries.append(entry)
    return {"images": entries, "dataset": "x"}


def write_coco_original(root: Path) -> None:
    """Karpathy's ``dataset_coco.json`` at the dataset root."""
    data = karpathy_original(
        KARPATHY_SPLIT, lambda i: COCO_IMAGES[i], lambda i: coco_image_path(i).split("/")[1], "cocoid"
    )
    write_json(root / "dataset_coco.json", data)


def write_coco_official(root: Path, year: int = 2014) -> None:
    """``annotations/captions_{train,val}{year}.json``; one extra image without captions in each file."""
    for split in ("train", "val"):
        ids = [i for i, folder in COCO_IMAGES.items() if folder.startswith(split)]
        folder = f"{split}{year}"
        images = [
            {
                "id": i,
                "file_name": coco_image_path(i, year).split("/")[1],
                "height": 8,
                "width": 8,
                "coco_url": f"http://images.cocodataset.org/{folder}/x.jpg",
            }
            for i in ids
        ]
        images.append({"id": 999, "file_name": "unused.jpg", "height": 8, "width": 8})
        annotations = [
            {"id": 100 * i + k, "image_id": i, "caption": c} for i in ids for k, c in enumerate(captions_of(i))
        ]
        write_json(
            root / "annotations" / f"captions_{folder}.json", {"info": {}, "images": images, "annotations": annotations}
        )


VQA_QUESTIONS = {  # split -> [(question_id, image_id)]
    "train2014": [(10, 1), (11, 1), (20, 2)],
    "val2014": [(40, 4), (50, 5)],
    "test-dev2015": [(70, 7)],
}


def vqa_answers(question_id: int) -> list[str]:
    return ["yes"] * 6 + ["no"] * 3 + [str(question_id)]


def write_vqa(
    root: Path,
    questions_prefix: str = "v2_OpenEnded_mscoco",
    annotations_prefix: str = "v2_mscoco",
    questions_dir: str = "",
    annotations_dir: str = "",
    multiple_choice: bool = True,
    images_dir: str = "",
) -> Path:
    for split, pairs in VQA_QUESTIONS.items():
        folder = "test2015" if split.startswith("test") else split
        for _, image_id in pairs:
            write_image(root / images_dir / folder / f"COCO_{folder}_{image_id:012d}.jpg", image_id)
        questions = [{"image_id": i, "question": f"is {q} there?", "question_id": q} for q, i in pairs]
        write_json(
            root / questions_dir / f"{questions_prefix}_{split}_questions.json",
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": split,
                "license": {},
                "questions": questions,
            },
        )
        if split.startswith("test"):
            continue
        annotations = []
        for q, i in pairs:
            annotation = {
                "question_id": q,
                "image_id": i,
                "question_type": "is",
                "answer_type": "yes/no",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(vqa_answers(q))
                ],
            }
            if multiple_choice:
                annotation["multiple_choice_answer"] = "yes"
            annotations.append(annotation)
        write_json(
            root / annotations_dir / f"{annotations_prefix}_{split}_annotations.json",
            {"info": {}, "license": {}, "data_subtype": split, "annotations": annotations},
        )
    return root


NLVR2_LINES = {
    "train": [("train-10-0-0", "True", 3), ("train-10-0-1", "False", 3), ("train-11-2-0", "False", 7)],
    "dev": [("dev-850-0-0", "True", None), ("dev-851-1-3", "False", None)],
    "test1": [("test1-5-0-0", "False", None)],
}


def write_imagenet(root: Path, wnids: tuple[str, ...] = IMAGENET_WNIDS, flat_val: bool = False) -> Path:
    """``train/{wnid}/{wnid}_{n}.JPEG`` (3 per class) and val per-wnid folders or flat files + Kaggle CSV."""
    for c, wnid in enumerate(wnids):
        for n in range(3):
            write_image(root / "train" / wnid / f"{wnid}_{n}.JPEG", 10 * c + n)
    rows = ["ImageId,PredictionString"]
    for index in range(2 * len(wnids)):
        wnid = wnids[index % len(wnids)]
        name = f"ILSVRC2012_val_{index + 1:08d}"
        if flat_val:
            write_image(root / "val" / f"{name}.JPEG", index)
            rows.append(f"{name},{wnid} 1 2 7 7 {wnid} 0 0 3 3")
        else:
            write_image(root / "val" / wnid / f"{name}.JPEG", index)
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root
