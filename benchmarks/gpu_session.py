"""Every GPU figure the open benchmarks ask for, in one unattended run that fits a short GPU lease (under 10 minutes).

A lent GPU comes with about 15 minutes of device time, machine start included, so the parts below run in priority
order, each under its own wall-clock limit (a part that runs over is stopped with its whole process group and
the next one starts; the benchmarks rewrite their JSON and markdown after every method, so a stopped part still
leaves what it finished). Limits are the estimates from the H100 figures in ``benchmarks/RESULTS.md`` plus a margin:

==============  =====  ======================================================================================
part            limit  estimate (H100, bf16)
==============  =====  ======================================================================================
sparse_speed     55 s  ~40 s: import ~10 s, BLIP-2 OPT-2.7B built in 0.5 s, 2:4 masks, 4 x 13 forwards of
                       batch 16 (~50 ms dense), the semi-structured swap
opt             160 s  ~125 s: full_size.py (each method a fresh worker process, ~10 s of start-up each) Wanda 18 s +
                       first order 22 s + zeroth order ~45 s (16 coarse samples: the plain loop took 73 s for 32),
                       and again with up to 32 probes per forward ~40 s
flant5          140 s  ~115 s: the same three methods on FlanT5-XL shapes (~1.7x the candidate tensors of OPT)
llava_7b         90 s  ~60 s: 7.1 B parameters built on the GPU, ~370 per-tensor probes of a batch of 4 x 608
                       tokens (~0.08 s a forward, half of it skipped by prefix reuse), Wanda on 32 samples
llava_70b        90 s  ~55 s: twice (Wanda, zeroth order) build 2 Llama-2-70B blocks + ViT-L (5 GB) on the GPU,
                       move them to CPU memory, then every forward copies the 3.4 GB of blocks over PCIe
                       (~0.3 s); per-block probes: 26 units x 2 forwards
pytest_gpu       40 s  ~30 s: ``pytest -m gpu`` on the two files holding GPU tests (collection ~15 s)
==============  =====  ======================================================================================

Total of the limits: 575 s (of the estimates: 425 s). Written under ``--out`` (the device tool's ``$OUT``):
``session.json`` (each part's status, seconds, limit), ``gpu_sections.md`` (every benchmark's RESULTS.md section,
plus this session's table), the benchmarks' JSON files and ``log.txt`` (everything they printed). Back on the CPU
machine, ``python benchmarks/gpu_session.py --merge FILES_AT/gpu_sections.md`` replaces those sections of
``benchmarks/RESULTS.md``. ``--tiny`` runs the same parts at tiny scale on the CPU (the check
``tests/benchmarks/test_gpu_session.py`` makes); the GPU-only parts then report that they need a GPU.

Nothing here reaches the network: every model is built from a config in code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from _results import write_section

logger = logging.getLogger("gpu_session")
SECTION = "## GPU session: what ran"
TINY_FLAG = "--tiny"
NEEDS_GPU_STATUS = 2  # sparse_speed.py's exit status without a CUDA device


@dataclass(frozen=True)
class Part:
    """One benchmark of the session: its command (``{out}`` is the output folder), wall-clock limit, estimate."""

    name: str
    command: tuple[str, ...]
    limit_s: int
    estimate_s: int
    what: str


def gpu_parts() -> list[Part]:
    """The session's parts on a GPU, in priority order (issue 17's 2:4 speed-up, issue 14's ZO vs FO, issue 16)."""
    full_size = ("benchmarks/full_size.py", "--methods", "zeroth_order", "first_order", "wanda")
    wider_probes = ("zeroth_order_32_replicas",)  # whether the default cap of 8 probes per forward leaves speed behind
    return [
        Part("sparse_speed", ("benchmarks/sparse_speed.py", "--batch-size", "16"), 55, 40, "2:4 vs dense forward"),
        Part(
            "opt",
            (*full_size, *wider_probes, "--coarse-samples", "16", "--json", "{out}/full_size_opt.json"),
            160,
            125,
            "BLIP-2 OPT-2.7B: zeroth (8 and 32 probes per forward) vs first order vs Wanda",
        ),
        Part(
            "flant5",
            (*full_size, "--scale", "flant5_xl", "--coarse-samples", "16", "--json", "{out}/full_size_flant5.json"),
            140,
            115,
            "BLIP-2 FlanT5-XL: zeroth vs first order vs Wanda",
        ),
        Part(
            "llava_7b",
            ("benchmarks/llava_size.py", "--scale", "7b", "--json", "{out}/llava_7b.json"),
            90,
            60,
            "LLaVA-1.5-7B, ECoFLaP zeroth order + Wanda",
        ),
        Part(
            "llava_70b",
            ("benchmarks/llava_size.py", "--scale", "70b_offload", "--layers", "2", "--json", "{out}/llava_70b.json"),
            90,
            55,
            "70B-class LLaVA, decoder blocks in CPU memory",
        ),
        Part(
            "pytest_gpu",
            (
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                "-n",
                "0",  # one process: the two files' GPU tests share the one device
                "tests/export/test_semi_structured.py",
                "tests/models/test_placement.py",
            ),
            40,
            30,
            "the GPU-marked tests",
        ),
    ]


def tiny_parts() -> list[Part]:
    """The same benchmarks at tiny scale on the CPU (the GPU-only parts are kept: they must say they need a GPU).

    The limits only stop a hung part: on a loaded 2-core machine one Python start with torch and transformers can take
    a minute, and full_size.py starts one per method.
    """
    cpu = ("--device", "cpu", "--dtype", "float32")
    full_size = ("benchmarks/full_size.py", *cpu, "--repeats", "1", "--methods")
    return [
        Part(
            "sparse_speed",
            ("benchmarks/sparse_speed.py", "--scale", "tiny", "--batch-size", "2"),
            900,
            10,
            "needs a GPU",
        ),
        Part(
            "opt",
            (
                *full_size,
                "zeroth_order",
                "first_order",
                "wanda",
                "--scale",
                "tiny",
                "--json",
                "{out}/full_size_opt.json",
            ),
            900,
            30,
            "tiny BLIP-2 OPT",
        ),
        Part(
            "flant5",
            (*full_size, "zeroth_order", "--scale", "flant5_tiny", "--json", "{out}/full_size_flant5.json"),
            900,
            30,
            "tiny BLIP-2 FlanT5 (zeroth order: the methods' paths are the OPT part's)",
        ),
        Part(
            "llava_7b",
            ("benchmarks/llava_size.py", "--scale", "tiny", *cpu, "--json", "{out}/llava_7b.json"),
            900,
            10,
            "tiny LLaVA",
        ),
        Part(
            "llava_70b",
            (
                "benchmarks/llava_size.py",
                "--scale",
                "tiny_offload",
                *cpu,
                "--offload",
                "disk",
                "--json",
                "{out}/llava_70b.json",
            ),
            900,
            10,
            "tiny LLaVA, decoder blocks on disk",
        ),
    ]


def run_part(part: Part, out: str, log: Any) -> dict[str, Any]:
    """Run ``part`` in its own process group (full_size.py spawns workers) and stop the whole group at its limit."""
    command = [sys.executable, *(argument.replace("{out}", out) for argument in part.command)]
    if part.name != "pytest_gpu":
        command += ["--write", os.path.join(out, "gpu_sections.md")]
    log.write(f"\n===== {part.name}: {' '.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a part stopped at its limit keeps what it printed
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment)
    try:
        status: int | None = process.wait(timeout=part.limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        status = None
    seconds = time.perf_counter() - started
    outcome = "ok" if status == 0 else "timed out" if status is None else f"exit {status}"
    if status == NEEDS_GPU_STATUS and part.name == "sparse_speed":
        outcome = "needs a GPU"
    logger.info(
        "%s: %s in %.0f s (limit %d s, estimate %d s)", part.name, outcome, seconds, part.limit_s, part.estimate_s
    )
    return {**asdict(part), "command": command, "status": status, "outcome": outcome, "seconds": seconds}


def device_line() -> str:
    """``nvidia-smi``'s name/memory/driver line, or why there is none."""
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        completed = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "no nvidia-smi (no NVIDIA GPU)"
    return completed.stdout.strip() or completed.stderr.strip()


def render(device: str, parts: list[dict[str, Any]], total: float, tiny: bool) -> str:
    command = "python benchmarks/gpu_session.py" + (f" {TINY_FLAG}" if tiny else "")
    lines = [
        SECTION,
        "",
        f"`{command}` on {device}; {total:.0f} s in all. The sections above marked with this "
        "session's commands come from it.",
        "",
        "| part | what | outcome | seconds | limit s | estimate s |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {p['name']} | {p['what']} | {p['outcome']} | {p['seconds']:.0f} | {p['limit_s']} | {p['estimate_s']} |"
        for p in parts
    ]
    return "\n".join(lines) + "\n"


def sections(path: str) -> dict[str, str]:
    """The ``## `` sections of a markdown file, heading -> whole section."""
    text = open(path, encoding="utf-8").read()
    found = re.findall(r"^(## .*?\n.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return {section.splitlines()[0]: section.rstrip("\n") + "\n" for section in found}


def merge(fragment: str, into: str) -> list[str]:
    """Replace (or append) every section of ``fragment`` in ``into``; the headings merged."""
    merged = sections(fragment)
    if not merged:
        raise SystemExit(f"{fragment} holds no '## ' section. HINT: pass the gpu_sections.md of a GPU session")
    if f"gpu_session.py {TINY_FLAG}`" in merged.get(SECTION, ""):
        raise SystemExit(
            f"{fragment} comes from a {TINY_FLAG} run (tiny models on the CPU); merging it would replace the GPU "
            "figures. HINT: merge the gpu_sections.md that a GPU session wrote"
        )
    for heading, section in merged.items():
        write_section(into, heading, section)
    return list(merged)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument(TINY_FLAG, action="store_true", help="tiny scales on the CPU (a check of the parts)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these parts (names as in the table)")
    parser.add_argument("--merge", default=None, help="gpu_sections.md of a session: merge into --into and stop")
    parser.add_argument("--into", default="benchmarks/RESULTS.md", help="with --merge: the file to update")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.merge is not None:
        logger.info("merged into %s: %s", args.into, "; ".join(merge(args.merge, args.into)))
        return
    if not args.out:
        parser.error("no output folder. HINT: pass --out DIR (on the device machine $OUT is set)")
    if not os.path.isfile("benchmarks/full_size.py"):
        parser.error("run it from the repository root. HINT: cd to the checkout, then python benchmarks/gpu_session.py")
    os.makedirs(args.out, exist_ok=True)
    parts = tiny_parts() if args.tiny else gpu_parts()
    if args.only is not None:
        unknown = sorted(set(args.only) - {part.name for part in parts})
        if unknown:
            parser.error(f"unknown part(s) {unknown}. HINT: choose from {[part.name for part in parts]}")
        parts = [part for part in parts if part.name in args.only]
    device = device_line()
    logger.info("device: %s; %d parts, limits %d s in all", device, len(parts), sum(p.limit_s for p in parts))
    started = time.perf_counter()
    done: list[dict[str, Any]] = []
    fragment = os.path.join(args.out, "gpu_sections.md")
    with open(os.path.join(args.out, "log.txt"), "a", encoding="utf-8") as log:
        for part in parts:
            done.append(run_part(part, args.out, log))
            total = time.perf_counter() - started
            with open(os.path.join(args.out, "session.json"), "w", encoding="utf-8") as handle:
                json.dump({"device": device, "tiny": args.tiny, "seconds": total, "parts": done}, handle, indent=1)
            write_section(fragment, SECTION, render(device, done, total, args.tiny))


if __name__ == "__main__":
    main()
