"""The demo's COCO captions: the official ``captions_{train,val}2014.json`` and the BLIP/LAVIS Karpathy split."""

from __future__ import annotations

from pathlib import Path

from ecoflap_pl.demo.data.files import write_json
from ecoflap_pl.demo.data.scenes import Scene, seeded_rng
from ecoflap_pl.demo.data.texts import scene_captions

LICENSE = {
    "id": 1,
    "name": "UCI ML hand-written digits (CC BY 4.0), bundled with scikit-learn",
    "url": "https://archive.ics.uci.edu/dataset/80",
}
INFO = {
    "description": "ecoflap-pl demo: synthetic scenes of scikit-learn handwritten digits",
    "version": "1.0",
    "year": 2014,
    "contributor": "ecoflap-pl",
    "date_created": "2014-01-01 00:00:00",
}


def coco_file(folder: str, image_id: int) -> str:
    """The path of a COCO image under the dataset root: ``{folder}/COCO_{folder}_{image_id:012d}.jpg``."""
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def write_coco(coco: Path, scenes: dict[str, list[Scene]], seed: int, image_size: int) -> list[str]:
    """Official `captions_{train,val}2014.json` and the Karpathy split; returns the training captions."""
    captions = {
        split: [
            scene_captions(scene, seeded_rng(seed, "captions", split, str(scene.image_id))) for scene in scenes[split]
        ]
        for split in ("train", "val", "test")
    }
    annotation_id = 1
    for folder, splits in (("train2014", ("train",)), ("val2014", ("val", "test"))):
        images, annotations = [], []
        for split in splits:
            for scene, texts in zip(scenes[split], captions[split], strict=True):
                images.append(_coco_image(folder, scene.image_id, image_size))
                for text in texts:
                    annotations.append({"image_id": scene.image_id, "id": annotation_id, "caption": text})
                    annotation_id += 1
        document = {"info": INFO, "licenses": [LICENSE], "images": images, "annotations": annotations}
        write_json(coco / "annotations" / f"captions_{folder}.json", document)
    karpathy_train = [
        {"caption": text, "image": coco_file("train2014", scene.image_id), "image_id": f"coco_{scene.image_id}"}
        for scene, texts in zip(scenes["train"], captions["train"], strict=True)
        for text in texts
    ]
    write_json(coco / "annotations" / "coco_karpathy_train.json", karpathy_train)
    for split in ("val", "test"):
        entries = [
            {"image": coco_file("val2014", scene.image_id), "caption": texts}
            for scene, texts in zip(scenes[split], captions[split], strict=True)
        ]
        write_json(coco / "annotations" / f"coco_karpathy_{split}.json", entries)
    return [text for texts in captions["train"] for text in texts]


def _coco_image(folder: str, image_id: int, image_size: int) -> dict:
    file_name = f"COCO_{folder}_{image_id:012d}.jpg"
    return {
        "license": 1,
        "file_name": file_name,
        "coco_url": f"synthetic://ecoflap-demo/{folder}/{file_name}",
        "height": image_size,
        "width": image_size,
        "date_captured": "2014-01-01 00:00:00",
        "flickr_url": "",
        "id": image_id,
    }
