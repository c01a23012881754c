"""The demo's NLVR2: JSON-lines files with one true and one false statement per pair of scenes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecoflap_pl.demo.data.scenes import Scene, seeded_rng
from ecoflap_pl.demo.data.texts import true_and_false


def nlvr2_image(split: str, pair: int, side: int) -> str:
    """The path of one image of an NLVR2 pair under the dataset root (train images sit in 10 numbered folders)."""
    name = f"{split}-{pair}-0-img{side}.png"
    return f"train/{pair % 10}/{name}" if split == "train" else f"{split}/{name}"


def write_nlvr2(nlvr2: Path, scenes: dict[str, list[Scene]], seed: int, names: dict[str, str]) -> list[str]:
    """`{train,dev,test1}.json`: two statements (one true, one false) per consecutive pair of scenes."""
    corpus: list[str] = []
    for split, name in names.items():
        rng = seeded_rng(seed, "nlvr2", split)
        lines = []
        for pair in range(len(scenes[split]) // 2):
            left, right = scenes[split][2 * pair], scenes[split][2 * pair + 1]
            for k, (sentence, truth) in enumerate(true_and_false(left, right, rng)):
                label = str(truth)
                votes = [label if rng.random() < 0.95 else str(not truth) for _ in range(3)]
                line: dict[str, Any] = {
                    "validation": {
                        str(int(w)): v for w, v in zip(rng.choice(100, 3, replace=False), votes, strict=True)
                    },
                    "sentence": sentence,
                    "left_url": f"synthetic://ecoflap-demo/nlvr2/{nlvr2_image(name, pair, 0)}",
                    "writer": str(int(rng.integers(100))),
                    "label": label,
                    "right_url": f"synthetic://ecoflap-demo/nlvr2/{nlvr2_image(name, pair, 1)}",
                    "synset": "handwritten digit",
                    "query": f"handwritten digit{pair}",
                    "identifier": f"{name}-{pair}-0-{k}",
                }
                if name == "train":
                    line["directory"] = pair % 10
                lines.append(json.dumps(line))
                if name == "train":
                    corpus.append(sentence)
        (nlvr2 / f"{name}.json").write_text("".join(f"{line}\n" for line in lines))
    return corpus
