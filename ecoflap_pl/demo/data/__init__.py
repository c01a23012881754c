"""Small multimodal demo datasets built from real handwritten digits, written in the official layouts.

The pictures are *scenes*: one to three of scikit-learn's bundled 8x8 handwritten digits
(`sklearn.datasets.load_digits`, 1797 samples, no download), upscaled to varied sizes, coloured from a small
palette and placed left to right on a dark background. Every text (captions, VQA questions and answers,
NLVR2 statements) is generated from the scene's ground truth, so a model can actually learn it. Digits come from
disjoint sample pools for train, val and test: evaluation always sees handwriting that training never saw.

`build_demo_data(root)` writes, under `root` (exactly the layouts of docs/data_formats.md, so the demo goes through
the same DataModules users run on the real datasets)::

    coco/                                        COCO captions and VQAv2 (shared images, as in the real datasets)
      train2014/COCO_train2014_{id:012d}.jpg     train scenes
      val2014/COCO_val2014_{id:012d}.jpg         val scenes, then test scenes (Karpathy val / test)
      test2015/COCO_test2015_{id:012d}.jpg       further unseen scenes (VQAv2 test, no annotations)
      annotations/captions_{train,val}2014.json  official COCO captions
      annotations/coco_karpathy_{train,val,test}.json   BLIP/LAVIS Karpathy split
      v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
      v2_mscoco_{train2014,val2014}_annotations.json
      answer_list.json                           LAVIS-style candidate answers (digits, colours, yes, no)
    nlvr2/{train,dev,test1}.json                 JSON lines; images train/{directory}/train-{p}-0-img{0,1}.png,
                                                 dev/dev-{p}-0-img{0,1}.png, test1/test1-{p}-0-img{0,1}.png
    imagenet/train/{wnid}/{wnid}_{n}.JPEG        single digits; 10 SYNTHETIC wnids n00000000..n00000009
    imagenet/val/{wnid}/ILSVRC2012_val_{k:08d}.JPEG   (the per-wnid val layout of ImageNet's valprep.sh)
    imagenet/LOC_synset_mapping.txt              "n00000003 digit three" (Kaggle's class-name file)
    imagenet/class_names.json                    {"n00000003": "digit three", ...} (`class_names_file`)
    imagenet_flat/val/ILSVRC2012_val_{k:08d}.JPEG + LOC_val_solution.csv   the flat Kaggle val variant
    imagenet_flat/train -> ../imagenet/train     (symlink), and the same two class-name files
    scenes.json                                  ground truth of every picture (digits, colours, boxes)
    corpus.txt                                   every training text, one per line (to train a tokenizer)
    ecoflap_demo.json                            marker: the parameters this directory was built with

The wnids are synthetic (digit d is `n0000000d`): they are not WordNet ids and collide with no real class.

Modules, one concept each: :mod:`.scenes` (ground truth), :mod:`.render` (pictures), :mod:`.texts` (captions,
questions, statements), one writer per dataset (:mod:`.coco`, :mod:`.vqav2`, :mod:`.nlvr2`, :mod:`.imagenet`) and
:mod:`.build` (`build_demo_data`, the cached build of them all).
"""

from ecoflap_pl.demo.data.build import DATA_VERSION, DemoPaths, build_demo_data
from ecoflap_pl.demo.data.files import Progress
from ecoflap_pl.demo.data.scenes import ANSWER_VOCABULARY, CLASS_NAMES, COLOURS, WNIDS, Digit, Scene

__all__ = [
    "ANSWER_VOCABULARY",
    "CLASS_NAMES",
    "COLOURS",
    "DATA_VERSION",
    "DemoPaths",
    "Digit",
    "Progress",
    "Scene",
    "WNIDS",
    "build_demo_data",
]
