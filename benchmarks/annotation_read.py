"""Time and memory of reading the largest official annotation files, as ``ecoflap`` now does before building the model.

Synthetic files of the official sizes and shapes: VQAv2 ``train2014`` (443,757 questions over 82,783 images, each
question with 10 answers: a 0.35 GB annotation file) and COCO's Karpathy ``coco_karpathy_train.json`` (566,747
captions of 113,287 images); the images are empty files (only their names are looked up). Each case runs in a fresh
process: ``json.load`` of each file alone, then the whole split read through its DataModule (``dataset("train")``:
parse, samples, image check), with the peak resident memory of that process.

Usage::

    python benchmarks/annotation_read.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import publish_section

SECTION = "## Reading the annotation files before the model is built"
WORDS = "what is the color of man woman dog cat table red blue green how many people are there yes no two".split()
VQA_QUESTIONS, VQA_IMAGES = 443_757, 82_783
KARPATHY_CAPTIONS, KARPATHY_IMAGES = 566_747, 113_287


def write_vqa(root: Path) -> list[Path]:
    rng = random.Random(0)
    (root / "train2014").mkdir(parents=True)
    for image_id in range(VQA_IMAGES):
        (root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg").touch()
    questions, annotations = [], []
    for index in range(VQA_QUESTIONS):
        image_id, question_id = index * VQA_IMAGES // VQA_QUESTIONS, index * 10
        text = " ".join(rng.choice(WORDS) for _ in range(7)) + "?"
        questions.append({"image_id": image_id, "question": text, "question_id": question_id})
        answers = [
            {"answer": rng.choice(WORDS), "answer_confidence": rng.choice(("yes", "maybe", "no")), "answer_id": k + 1}
            for k in range(10)
        ]
        annotations.append(
            {
                "question_type": "what is the",
                "multiple_choice_answer": answers[0]["answer"],
                "answers": answers,
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    paths = [root / "v2_OpenEnded_mscoco_train2014_questions.json", root / "v2_mscoco_train2014_annotations.json"]
    header = {"info": {}, "license": {}, "data_subtype": "train2014"}
    paths[0].write_text(json.dumps({**header, "task_type": "Open-Ended", "questions": questions}), encoding="utf-8")
    paths[1].write_text(json.dumps({**header, "annotations": annotations}), encoding="utf-8")
    return paths


def write_karpathy(root: Path) -> list[Path]:
    rng = random.Random(0)
    names = []
    for folder, count in (("train2014", 82_783), ("val2014", KARPATHY_IMAGES - 82_783)):
        (root / folder).mkdir(parents=True)
        for image_id in range(count):
            name = f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
            (root / name).touch()
            names.append(name)
    entries = [
        {
            "image": names[index * KARPATHY_IMAGES // KARPATHY_CAPTIONS],
            "caption": " ".join(rng.choice(WORDS) for _ in range(10)),
            "image_id": f"coco_{index * KARPATHY_IMAGES // KARPATHY_CAPTIONS}",
        }
        for index in range(KARPATHY_CAPTIONS)
    ]
    path = root / "coco_karpathy_train.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return [path]


CASES = {"VQAv2 train2014": ("vqa", write_vqa), "COCO Karpathy train": ("coco", write_karpathy)}


def measure(name: str, root: Path) -> dict[str, object]:
    """In this (fresh) process: ``json.load`` of each file, then the split read through its DataModule."""
    from ecoflap_pl.datamodules import COCOCaptionDataModule, VQAv2DataModule

    files = sorted(root.glob("*.json"))
    parse = {}
    for path in files:
        started = time.perf_counter()
        with path.open(encoding="utf-8") as handle:
            json.load(handle)
        parse[path.name] = time.perf_counter() - started
    datamodule = VQAv2DataModule(root) if CASES[name][0] == "vqa" else COCOCaptionDataModule(root)
    started = time.perf_counter()
    samples = len(datamodule.dataset("train"))
    read = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes = {path.name: path.stat().st_size for path in files}
    return {"parse": parse, "sizes": sizes, "read": read, "samples": samples, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="folder to write the files in (default: a temporary folder)")
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a case, measured in this process (run by main)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.root))))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as folder:
        for name, (short, write) in CASES.items():
            root = Path(folder) / short
            write(root)
            command = [sys.executable, __file__, "--measure", name, "--root", str(root)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append((name, result))
            print(name, result, file=sys.stderr)
    lines = [
        SECTION,
        "",
        "`python benchmarks/annotation_read.py` (synthetic files of the official sizes, empty image files, warm page "
        "cache; each case in a fresh process): `json.load` of each file, then the whole training split read through "
        "its DataModule (parse, samples, image check: what `ecoflap` now does before it builds the model, and what "
        "`setup` did after it before), and the peak resident memory of that process. "
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after the run (shared with other jobs), local disk.",
        "",
        "| split | file: size, json.load | samples | whole split read | peak RSS |",
        "|---|---|---:|---:|---:|",
    ]
    for name, result in rows:
        files = "; ".join(
            f"`{file}`: {result['sizes'][file] / 1e6:.0f} MB, {seconds:.1f} s"
            for file, seconds in result["parse"].items()
        )
        lines.append(
            f"| {name} | {files} | {result['samples']:,} | {result['read']:.1f} s | {result['peak'] / 2**30:.2f} GiB |"
        )
    publish_section("\n".join(lines) + "\n", SECTION, args.write)


if __name__ == "__main__":
    main()
