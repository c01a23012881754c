#!/usr/bin/env bash
# Run on the CPU machine, from the repository root, right before a GPU session: puts into .gpu_deps/site (ignored by
# git; the device tool carries it with `carry: [".gpu_deps"]`) the pure-Python packages this project imports that the
# GPU machines' image lacks (checked against its package list): jsonargparse with its `signatures` extras,
# pycocoevalcap, and pytest-xdist with execnet (pyproject's pytest options name its `-n`). The GPU machine reaches no
# registry, so they travel from here. pycocoevalcap ships 104 MB of Java jars and METEOR data, over the 64 MiB a call
# carries; only its Python files travel (the GPU parts import its BLEU and CIDEr scorers, never run METEOR or SPICE).
# Everything else (torch, transformers, accelerate, lightning, timm, pytest) is in the image.
set -euo pipefail
PYTHON=${PYTHON:-python3}
rm -rf .gpu_deps
mkdir -p .gpu_deps/wheels
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .gpu_deps/wheels \
    jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 pycocoevalcap==1.2 \
    pytest-xdist==3.8.0 execnet==2.1.2
"$PYTHON" -m pip install -q --no-deps --no-compile --target .gpu_deps/site .gpu_deps/wheels/*.whl
find .gpu_deps/site/pycocoevalcap -type f ! -name '*.py' -delete
rm -rf .gpu_deps/wheels
du -sh .gpu_deps
