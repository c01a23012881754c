"""The demo datasets: official layouts read back file by file, ground truth, reproducibility, cache and errors."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecoflap_pl.demo import ANSWER_VOCABULARY, CLASS_NAMES, COLOURS, WNIDS, DemoPaths, build_demo_data

SIZES = {
    "train_images": 8,
    "val_images": 4,
    "test_images": 6,
    "imagenet_train_images": 20,
    "imagenet_val_images": 12,
    "questions_per_image": 2,
    "image_size": 32,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=3, **SIZES)


@pytest.fixture(scope="module")
def scenes(demo: DemoPaths) -> dict:
    return json.loads(demo.scenes.read_text())


def load(path: Path):
    return json.loads(path.read_text())


def image_ids(scenes: dict, *splits: str) -> list[int]:
    return [scene["image_id"] for split in splits for scene in scenes["splits"][split]]


def check_image(path: Path, size: int = SIZES["image_size"]) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (size, size)


# ------------------------------------------------------------------------------------------------- COCO captions


def test_official_coco_captions(demo: DemoPaths, scenes: dict) -> None:
    for folder, splits in (("train2014", ("train",)), ("val2014", ("val", "test"))):
        document = load(demo.coco / "annotations" / f"captions_{folder}.json")
        assert set(document) == {"info", "licenses", "images", "annotations"}
        assert [image["id"] for image in document["images"]] == image_ids(scenes, *splits)
        for image in document["images"]:
            assert image["file_name"] == f"COCO_{folder}_{image['id']:012d}.jpg"
            assert (image["height"], image["width"]) == (SIZES["image_size"],) * 2
            check_image(demo.coco / folder / image["file_name"])
        per_image = Counter(a["image_id"] for a in document["annotations"])
        assert set(per_image.values()) == {5} and set(per_image) == set(image_ids(scenes, *splits))
        ids = [a["id"] for a in document["annotations"]]
        assert len(set(ids)) == len(ids)
        assert all(isinstance(a["caption"], str) and a["caption"] for a in document["annotations"])


def test_karpathy_split(demo: DemoPaths, scenes: dict) -> None:
    train = load(demo.coco / "annotations" / "coco_karpathy_train.json")
    assert len(train) == 5 * SIZES["train_images"]
    for entry in train:
        assert set(entry) == {"image", "caption", "image_id"} and isinstance(entry["caption"], str)
        number = int(entry["image_id"].removeprefix("coco_"))
        assert entry["image"] == f"train2014/COCO_train2014_{number:012d}.jpg"
        assert (demo.coco / entry["image"]).is_file()
    official = load(demo.coco / "annotations" / "captions_val2014.json")["annotations"]
    for split in ("val", "test"):
        entries = load(demo.coco / "annotations" / f"coco_karpathy_{split}.json")
        expected = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in image_ids(scenes, split)]
        assert [entry["image"] for entry in entries] == expected
        for entry, image_id in zip(entries, image_ids(scenes, split), strict=True):
            assert set(entry) == {"image", "caption"} and len(entry["caption"]) == 5
            assert entry["caption"] == [a["caption"] for a in official if a["image_id"] == image_id]
            assert len(set(entry["caption"])) == 5


def test_captions_describe_the_scene(demo: DemoPaths, scenes: dict) -> None:
    captions = load(demo.coco / "annotations" / "captions_train2014.json")["annotations"]
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for scene in scenes["splits"]["train"]:
        texts = [a["caption"] for a in captions if a["image_id"] == scene["image_id"]]
        for digit in scene["digits"]:
            value = digit["value"]
            assert any(re.search(rf"\b({value}|{words[value]})\b", text) for text in texts)
        for text in texts:  # no colour that the scene lacks
            assert all(colour not in text.split() for colour in set(COLOURS) - {d["colour"] for d in scene["digits"]})


# ------------------------------------------------------------------------------------------------------- VQAv2


def test_vqa_questions_and_annotations(demo: DemoPaths, scenes: dict) -> None:
    subsets = {"train2014": ("train",), "val2014": ("val", "test"), "test2015": ("test2015",)}
    all_question_ids: list[int] = []
    for subset, splits in subsets.items():
        document = load(demo.vqav2 / f"v2_OpenEnded_mscoco_{subset}_questions.json")
        assert set(document) == {"info", "task_type", "data_type", "data_subtype", "license", "questions"}
        assert (document["task_type"], document["data_type"], document["data_subtype"]) == (
            "Open-Ended",
            "mscoco",
            subset,
        )
        questions = document["questions"]
        assert len(questions) == SIZES["questions_per_image"] * len(image_ids(scenes, *splits))
        for question in questions:
            assert set(question) == {"image_id", "question", "question_id"}
            assert isinstance(question["question_id"], int) and question["question"].endswith("?")
            check_image(demo.coco / subset / f"COCO_{subset}_{question['image_id']:012d}.jpg")
        assert {q["image_id"] for q in questions} == set(image_ids(scenes, *splits))
        all_question_ids += [q["question_id"] for q in questions]
        if subset == "test2015":
            assert not (demo.vqav2 / f"v2_mscoco_{subset}_annotations.json").exists()
            continue
        annotations = load(demo.vqav2 / f"v2_mscoco_{subset}_annotations.json")
        assert set(annotations) == {"info", "license", "data_type", "data_subtype", "annotations"}
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        assert set(by_id) == {q["question_id"] for q in questions}
        for question in questions:
            annotation = by_id[question["question_id"]]
            assert set(annotation) == {
                "question_id",
                "image_id",
                "question_type",
                "answer_type",
                "multiple_choice_answer",
                "answers",
            }
            assert annotation["image_id"] == question["image_id"]
            assert annotation["answer_type"] in ("yes/no", "number", "other")
            assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
            assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in annotation["answers"])
            assert {a["answer_confidence"] for a in annotation["answers"]} <= {"yes", "maybe", "no"}
            words = {"zero": "0", "one": "1", "two": "2", "three": "3"}  # counted as numerals (VQA normalisation)
            counts = Counter(words.get(a["answer"], a["answer"]) for a in annotation["answers"])
            assert counts[annotation["multiple_choice_answer"]] == max(counts.values())
            assert annotation["multiple_choice_answer"] in ANSWER_VOCABULARY
            assert question["question"].startswith(annotation["question_type"])
    assert len(set(all_question_ids)) == len(all_question_ids)
    test_dev = load(demo.vqav2 / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
    test = load(demo.vqav2 / "v2_OpenEnded_mscoco_test2015_questions.json")
    assert test_dev["data_subtype"] == "test-dev2015" and test_dev["questions"]
    assert all(q in test["questions"] for q in test_dev["questions"])
    assert load(demo.vqav2 / "answer_list.json") == list(ANSWER_VOCABULARY)


def test_vqa_answers_match_the_scene(tmp_path: Path) -> None:
    paths = build_demo_data(tmp_path / "d", **{**SIZES, "train_images": 60, "questions_per_image": 6})
    scenes = {s["image_id"]: s for s in json.loads(paths.scenes.read_text())["splits"]["train"]}
    questions = load(paths.vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    annotations = {
        a["question_id"]: a for a in load(paths.vqav2 / "v2_mscoco_train2014_annotations.json")["annotations"]
    }
    checked, variants = Counter(), 0
    for question in questions:
        digits = scenes[question["image_id"]]["digits"]
        annotation, text = annotations[question["question_id"]], question["question"]
        answer = annotation["multiple_choice_answer"]
        answers = [a["answer"] for a in annotation["answers"]]
        variants += len(set(answers)) > 1
        if text == "how many digits are there?":
            assert answer == str(len(digits))
        elif match := re.fullmatch(r"what color is the (\d)\?", text):
            assert answer == next(d["colour"] for d in digits if d["value"] == int(match.group(1)))
        elif match := re.fullmatch(r"is there an? (\w+) digit\?", text):
            assert answer == ("yes" if any(d["colour"] == match.group(1) for d in digits) else "no")
        elif text == "what digit is on the left?":
            assert answer == str(digits[0]["value"])
        else:
            continue
        checked[text.split()[0]] += 1
    assert sum(checked.values()) > 50
    assert 0 < variants < len(questions)  # human answers vary sometimes, not always


# ------------------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_files(demo: DemoPaths, scenes: dict) -> None:
    keys = {"identifier", "sentence", "label", "left_url", "right_url", "synset", "query", "writer", "validation"}
    for name, split in (("train", "train"), ("dev", "val"), ("test1", "test")):
        lines = [json.loads(line) for line in (demo.nlvr2 / f"{name}.json").read_text().splitlines()]
        pairs = len(scenes["splits"][split]) // 2
        assert len(lines) == 2 * pairs
        labels = Counter(line["label"] for line in lines)
        assert labels == {"True": pairs, "False": pairs}
        for line in lines:
            assert set(line) == keys | ({"directory"} if name == "train" else set())
            match = re.fullmatch(rf"{name}-(\d+)-0-([01])", line["identifier"])
            assert match, line["identifier"]
            assert isinstance(line["sentence"], str) and line["sentence"]
            assert isinstance(line["writer"], str) and isinstance(line["validation"], dict)
            folder = demo.nlvr2 / name / (str(line["directory"]) if name == "train" else "")
            if name == "train":
                assert isinstance(line["directory"], int)
            stem = line["identifier"].rsplit("-", 1)[0]
            for side in (0, 1):
                check_image(folder / f"{stem}-img{side}.png")
        by_pair = Counter(line["identifier"].rsplit("-", 1)[0] for line in lines)
        assert set(by_pair.values()) == {2}


def test_nlvr2_images_are_the_scenes(demo: DemoPaths, scenes: dict) -> None:
    """Pair p shows scenes 2p and 2p+1 of the split: each PNG is closest to its own scene's JPEG."""
    ids = image_ids(scenes, "val", "test")
    jpegs = [np.asarray(Image.open(demo.coco / "val2014" / f"COCO_val2014_{i:012d}.jpg"), np.float32) for i in ids]
    for pair in range(SIZES["val_images"] // 2):
        for side in (0, 1):
            png = np.asarray(Image.open(demo.nlvr2 / "dev" / f"dev-{pair}-0-img{side}.png"), np.float32)
            errors = [np.abs(png - jpeg).mean() for jpeg in jpegs]
            assert int(np.argmin(errors)) == 2 * pair + side


# ----------------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_folders(demo: DemoPaths) -> None:
    for split, count in (("train", SIZES["imagenet_train_images"]), ("val", SIZES["imagenet_val_images"])):
        folders = sorted(p.name for p in (demo.imagenet / split).iterdir())
        assert folders == list(WNIDS)
        files = sorted((demo.imagenet / split).glob("*/*.JPEG"))
        assert len(files) == count
        assert min(Counter(f.parent.name for f in files).values()) >= count // 10
        for file in files:
            wnid = file.parent.name
            pattern = rf"{wnid}_\d+" if split == "train" else r"ILSVRC2012_val_\d{8}"
            assert re.fullmatch(pattern, file.stem), file
            check_image(file)
    mapping = (demo.imagenet / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping == [f"{wnid} {name}" for wnid, name in zip(WNIDS, CLASS_NAMES, strict=True)]
    assert CLASS_NAMES[3] == "digit three"
    assert load(demo.imagenet / "class_names.json") == dict(zip(WNIDS, CLASS_NAMES, strict=True))


def test_imagenet_flat_val(demo: DemoPaths) -> None:
    with (demo.imagenet_flat / "LOC_val_solution.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == SIZES["imagenet_val_images"] and set(rows[0]) == {"ImageId", "PredictionString"}
    for row in rows:
        wnid, *box = row["PredictionString"].split()
        assert len(box) == 4 and all(v.isdigit() for v in box)
        flat = demo.imagenet_flat / "val" / f"{row['ImageId']}.JPEG"
        check_image(flat)
        assert flat.read_bytes() == (demo.imagenet / "val" / wnid / flat.name).read_bytes()
    assert sorted((demo.imagenet_flat / "train").glob("*/*.JPEG"))  # the symlink to imagenet/train resolves
    assert (demo.imagenet_flat / "LOC_synset_mapping.txt").read_text() == (
        demo.imagenet / "LOC_synset_mapping.txt"
    ).read_text()


# ------------------------------------------------------------------------------------------------ ground truth


def test_evaluation_sees_unseen_handwriting(scenes: dict) -> None:
    def samples(*splits: str) -> set[int]:
        return {d["sample"] for split in splits for scene in scenes["splits"][split] for d in scene["digits"]}

    imagenet = {split: {entry["sample"] for entry in scenes["imagenet"][split]} for split in ("train", "val")}
    train = samples("train") | imagenet["train"]
    assert not train & (samples("val", "test", "test2015") | imagenet["val"])
    assert not samples("val") & samples("test", "test2015")


def test_digits_are_drawn_in_their_colour(demo: DemoPaths, scenes: dict) -> None:
    palette = np.asarray(list(COLOURS.values()), np.float32)
    palette /= palette.max(axis=1, keepdims=True)  # compare hues: a thin stroke is a dimmed colour
    for scene in scenes["splits"]["train"]:
        pixels = np.asarray(Image.open(demo.coco / "train2014" / f"COCO_train2014_{scene['image_id']:012d}.jpg"))
        for d in scene["digits"]:
            box = pixels[d["y"] : d["y"] + d["size"], d["x"] : d["x"] + d["size"]].reshape(-1, 3).astype(np.float32)
            bright = box.max(axis=1)
            ink = box[bright > max(0.6 * bright.max(), 60)]
            assert len(ink) >= 3
            ink /= ink.max(axis=1, keepdims=True)
            nearest = np.linalg.norm(palette[:, None] - ink[None], axis=2).argmin(axis=0)
            assert list(COLOURS)[np.bincount(nearest).argmax()] == d["colour"]


def test_corpus_holds_training_texts(demo: DemoPaths) -> None:
    corpus = demo.corpus.read_text().splitlines()
    captions = [e["caption"] for e in load(demo.coco / "annotations" / "coco_karpathy_train.json")]
    assert set(captions) <= set(corpus) and set(CLASS_NAMES) <= set(corpus)
    assert any(line.endswith("?") for line in corpus)


# ------------------------------------------------------------------------------------- reproducibility and cache


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(demo: DemoPaths, tmp_path: Path) -> None:
    again = build_demo_data(tmp_path / "again", seed=3, **SIZES)
    assert snapshot(again.root) == snapshot(demo.root)
    other = snapshot(build_demo_data(tmp_path / "other", seed=4, **SIZES).root)
    first = snapshot(demo.root)
    assert other.keys() == first.keys()
    for name in ("coco/annotations/captions_train2014.json", "nlvr2/train.json", "scenes.json"):
        assert other[name] != first[name]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_is_reused_and_rebuilt_when_parameters_change(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = build_demo_data(root, **SIZES)
    before = mtimes(root)
    assert build_demo_data(root, **SIZES) == first
    assert mtimes(root) == before
    changed = build_demo_data(root, **{**SIZES, "questions_per_image": 1})
    questions = load(changed.vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    assert len(questions) == SIZES["train_images"]
    assert json.loads((root / "ecoflap_demo.json").read_text())["params"]["questions_per_image"] == 1
    before = mtimes(root)
    build_demo_data(root, overwrite=True, **{**SIZES, "questions_per_image": 1})
    assert mtimes(root) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary directory left behind


def test_concurrent_builders_agree(tmp_path: Path) -> None:
    """Two DDP ranks building the same root at once both succeed and leave one complete build."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_demo_data(tmp_path / "shared", **SIZES), range(2)))
    assert results[0] == results[1]
    assert json.loads((tmp_path / "shared" / "ecoflap_demo.json").read_text())["params"]["image_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]
    assert len(load(results[0].coco / "annotations" / "coco_karpathy_train.json")) == 5 * SIZES["train_images"]


def test_progress_reports_every_image_stage(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    build_demo_data(tmp_path / "p", progress=lambda stage, done, total: calls.append((stage, done, total)), **SIZES)
    finals = {stage: (done, total) for stage, done, total in calls}
    assert finals == {
        "scenes train2014": (8, 8),
        "scenes val2014": (6, 6),  # the val scenes (4) then the test scenes (6) both go to val2014
        "scenes test2015": (6, 6),
        "imagenet train": (20, 20),
        "imagenet val": (12, 12),
    }


def test_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"`root` must be empty or hold an earlier demo build.*overwrite=True"):
        build_demo_data(tmp_path, **SIZES)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("name", "value"),
    [("train_images", 1), ("image_size", 16), ("questions_per_image", 7), ("seed", -1), ("val_images", 2.5)],
)
def test_rejects_bad_sizes(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"`{name}` must be an integer .*got {value!r}\. HINT: "):
        build_demo_data(tmp_path / "x", **{**SIZES, name: value})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ read back by the DataModules


def passthrough(batch: list[dict]) -> list[dict]:
    return batch


def test_coco_datamodule_reads_the_demo(demo: DemoPaths) -> None:
    from ecoflap_pl.datamodules import COCOCaptionDataModule

    karpathy = COCOCaptionDataModule(demo.coco, collate_fn=passthrough)
    counts = {stage: len(karpathy.dataset(stage)) for stage in ("train", "val", "test")}
    assert counts == {"train": 5 * SIZES["train_images"], "val": SIZES["val_images"], "test": SIZES["test_images"]}
    sample = karpathy.dataset("val")[0]
    assert len(sample["references"]) == 5 and sample["image"].size == (SIZES["image_size"],) * 2
    assert set(karpathy.dataset("train")[0]) == {"image", "image_id", "text"}
    official = COCOCaptionDataModule(demo.coco, annotation_format="official", test_split="val")
    assert len(official.dataset("train")) == 5 * SIZES["train_images"]
    assert len(official.dataset("val")) == SIZES["val_images"] + SIZES["test_images"]
    batch = next(iter(karpathy.calibration_dataloader(4)))
    assert len(batch) == 4 and all("text" in sample for sample in batch)


def test_vqa_datamodule_reads_the_demo(demo: DemoPaths) -> None:
    from ecoflap_pl.datamodules import VQAv2DataModule

    per_image = SIZES["questions_per_image"]
    module = VQAv2DataModule(demo.vqav2, test_split="test2015")
    assert len(module.dataset("train")) == per_image * SIZES["train_images"]
    assert len(module.dataset("val")) == per_image * (SIZES["val_images"] + SIZES["test_images"])
    assert len(module.dataset("test")) == per_image * SIZES["test_images"]
    sample = module.dataset("val")[0]
    assert len(sample["answers"]) == 10 and sample["answer"] in ANSWER_VOCABULARY and sample["answer_type"]
    test = module.dataset("test")[0]
    assert (test["answers"], test["answer"], test["answer_type"]) == ([], "", "")
    test_dev = VQAv2DataModule(demo.vqav2, test_split="test-dev2015").dataset("test")
    assert len(test_dev) == per_image * SIZES["test_images"] // 2
    assert test_dev[0]["image"].size == (SIZES["image_size"],) * 2


def test_nlvr2_datamodule_reads_the_demo(demo: DemoPaths) -> None:
    from ecoflap_pl.datamodules import NLVR2DataModule

    module = NLVR2DataModule(demo.nlvr2)
    counts = {stage: len(module.dataset(stage)) for stage in ("train", "val", "test")}
    pairs = {name: SIZES[f"{name}_images"] // 2 for name in ("train", "val", "test")}
    assert counts == {"train": 2 * pairs["train"], "val": 2 * pairs["val"], "test": 2 * pairs["test"]}
    train = [module.dataset("train")[i] for i in range(counts["train"])]
    assert sum(sample["label"] for sample in train) == pairs["train"]
    assert all(len(sample["images"]) == 2 for sample in train)


def test_imagenet_datamodule_reads_the_demo(demo: DemoPaths) -> None:
    from ecoflap_pl.datamodules import ImageNetDataModule

    folders = ImageNetDataModule(demo.imagenet, class_names_file="class_names.json")
    assert folders.classes == list(WNIDS) and folders.class_names == list(CLASS_NAMES)
    assert len(folders.dataset("train")) == SIZES["imagenet_train_images"]
    assert len(folders.dataset("val")) == SIZES["imagenet_val_images"]
    flat = ImageNetDataModule(demo.imagenet_flat, class_names_file="class_names.json")
    assert flat.classes == list(WNIDS) and flat.class_names == list(CLASS_NAMES)
    labels = sorted(flat.dataset("val")[i]["label"] for i in range(SIZES["imagenet_val_images"]))
    assert labels == sorted(folders.dataset("val")[i]["label"] for i in range(SIZES["imagenet_val_images"]))
    assert len(flat.dataset("train")) == SIZES["imagenet_train_images"]


def test_digits_sit_whole_in_distinct_cells_of_a_3x3_grid(scenes: dict) -> None:
    """One digit per cell, inside it, columns distinct and left to right: each is one patch of a cell-sized ViT."""
    cell = SIZES["image_size"] // 3
    for split in ("train", "val", "test", "test2015"):
        for scene in scenes["splits"][split]:
            columns = [digit["column"] for digit in scene["digits"]]
            assert columns == sorted(set(columns))
            for digit in scene["digits"]:
                assert (
                    digit["x"] // cell == digit["column"]
                    and (digit["x"] + digit["size"] - 1) // cell == digit["column"]
                )
                assert digit["y"] // cell == (digit["y"] + digit["size"] - 1) // cell < 3
                assert 3 * cell // 4 <= digit["size"] <= cell
    for digit in scenes["imagenet"]["train"] + scenes["imagenet"]["val"]:
        assert digit["x"] // cell == digit["column"] and 3 * cell // 4 <= digit["size"] <= cell


def test_position_words_name_the_grid_column() -> None:
    from ecoflap_pl.demo.data import Digit, Scene

    scene = Scene(1, (Digit(3, "red", 11, 0, 10, 0, 1), Digit(5, "blue", 22, 11, 10, 0, 2)))
    assert scene.sides == ("middle", "right")  # absolute columns, not the order among the digits
