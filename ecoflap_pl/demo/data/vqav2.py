"""The demo's VQAv2: the official question and annotation files (test2015 and test-dev2015 without annotations)
and the LAVIS-style answer list. The questions are about the COCO images."""

from __future__ import annotations

from pathlib import Path

from ecoflap_pl.demo.data.coco import INFO, LICENSE
from ecoflap_pl.demo.data.files import write_json
from ecoflap_pl.demo.data.scenes import ANSWER_VOCABULARY, Scene, seeded_rng
from ecoflap_pl.demo.data.texts import human_answers, most_common_answer, vqa_candidates


def write_vqav2(vqa: Path, scenes: dict[str, list[Scene]], seed: int, per_image: int) -> list[str]:
    """Official VQAv2 question and annotation files (test2015 and test-dev2015 without annotations)."""
    corpus: list[str] = []
    subsets = {"train2014": ("train",), "val2014": ("val", "test"), "test2015": ("test2015",)}
    for subset, splits in subsets.items():
        questions, annotations = [], []
        for split in splits:
            for scene in scenes[split]:
                rng = seeded_rng(seed, "vqa", split, str(scene.image_id))
                candidates = vqa_candidates(scene, rng)
                chosen = rng.choice(len(candidates), size=min(per_image, len(candidates)), replace=False)
                for k, index in enumerate(chosen):
                    qa = candidates[index]
                    question_id = scene.image_id * 1000 + k
                    questions.append({"image_id": scene.image_id, "question": qa.question, "question_id": question_id})
                    answers = human_answers(qa, rng)
                    annotations.append(
                        {
                            "question_type": qa.question_type,
                            "multiple_choice_answer": most_common_answer(answers),
                            "answers": answers,
                            "image_id": scene.image_id,
                            "answer_type": qa.answer_type,
                            "question_id": question_id,
                        }
                    )
                    if split == "train":
                        corpus += [qa.question, *(a["answer"] for a in answers)]
        header = {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE}
        write_json(
            vqa / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            {**header, "data_subtype": subset, "questions": questions},
        )
        if subset == "test2015":
            dev = questions[: len(questions) // 2]
            write_json(
                vqa / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                {**header, "data_subtype": "test-dev2015", "questions": dev},
            )
        else:
            write_json(
                vqa / f"v2_mscoco_{subset}_annotations.json",
                {
                    "info": INFO,
                    "license": LICENSE,
                    "data_type": "mscoco",
                    "data_subtype": subset,
                    "annotations": annotations,
                },
            )
    write_json(vqa / "answer_list.json", list(ANSWER_VOCABULARY))
    return corpus
