"""Every YAML under ``configs/`` (``configs/demo/`` is tested with the demo) parsed by the ``ecoflap`` CLI parser
and instantiated: task, DataModule (with the task's collator linked in), Trainer and pruning callback.

Experiment files are instantiated on their own; the layered pieces in ``model/``, ``data/``, ``pruning/`` and
``trainer/`` are composed with ``-c`` as a user composes them. The real ``from_pretrained`` names are replaced by
tiny models saved to disk (``save_pretrained``, with offline tokenizers and processors), timm names by tiny timm
keyword arguments, ``data_dir`` by an empty folder and the accelerator by the CPU; nothing is downloaded.
Every job runs in one subprocess (``instantiate_configs.py``), so torch, transformers and Lightning load once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import yaml
from transformers import (
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPProcessor,
    ViltForQuestionAnswering,
    ViltImageProcessor,
    ViltProcessor,
)

from ecoflap_pl.models.tiny import HF_FAMILIES, PROCESSOR_TEMPLATES, tiny_config, tiny_model, tiny_processor
from ecoflap_pl.models.tokenizers import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DRIVER = Path(__file__).with_name("instantiate_configs.py")
LAYERS = ("model", "data", "pruning", "trainer")

HUB_MODELS = {
    "Salesforce/blip2-opt-2.7b": "blip2_opt",
    "Salesforce/blip2-flan-t5-xl": "blip2_t5",
    "Salesforce/blip2-itm-vit-g": "blip2_itm",
    "Salesforce/blip-vqa-base": "blip",
    "Salesforce/blip-image-captioning-base": "blip",
    "Salesforce/blip-itm-base-flickr": "blip",
    "dandelin/vilt-b32-finetuned-nlvr2": "vilt",
    "dandelin/vilt-b32-finetuned-vqa": "vilt_vqa",
    "openai/clip-vit-base-patch16": "clip",
    "google/flan-t5-xl": "t5",
    "huggyllama/llama-7b": "llama",
    "llava-hf/llava-1.5-7b-hf": "llava",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "Salesforce/instructblip-flan-t5-xl": "instructblip",
    "google/paligemma-3b-pt-224": "paligemma",
    "google/siglip-base-patch16-224": "siglip",
}
"""The ``from_pretrained`` names the configs use -> the tiny model family that stands in for each."""

TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def yaml_files() -> list[Path]:
    """Every YAML under ``configs/`` except ``configs/demo/``."""
    return sorted(
        path for path in CONFIGS.rglob("*.y*ml") if path.relative_to(CONFIGS).parts[0] != "demo" and path.is_file()
    )


def layer(kind: str, name: str) -> Path:
    return CONFIGS / kind / f"{name}.yaml"


def model_data_pairs() -> dict[str, list[str]]:
    """Each ``model/`` file -> the ``data/`` files its header comment says it pairs with (all of them are tested)."""
    return {
        path.stem: sorted(set(re.findall(r"data/(\w+)\.yaml", path.read_text(encoding="utf-8"))))
        for path in sorted((CONFIGS / "model").glob("*.yaml"))
    }


def compositions() -> dict[str, list[Path]]:
    """Job name -> the config files of one ``ecoflap`` run, in ``-c`` order."""
    jobs: dict[str, list[Path]] = {}
    for path in sorted((CONFIGS / "experiments").glob("*.yaml")):
        jobs[f"experiments/{path.stem}"] = [path]
    for model, datas in model_data_pairs().items():
        for data in datas:
            jobs[f"model/{model}+data/{data}"] = [layer("model", model), layer("data", data), layer("trainer", "gpu")]
    for path in sorted((CONFIGS / "pruning").glob("*.yaml")):
        files = [layer("model", "blip2_opt_vqa"), layer("data", "vqav2"), path, layer("trainer", "gpu")]
        jobs[f"pruning/{path.stem}"] = files
    for path in sorted((CONFIGS / "trainer").glob("*.yaml")):
        pieces = [layer("model", "blip_caption"), layer("data", "coco_caption"), layer("pruning", "wanda")]
        jobs[f"trainer/{path.stem}"] = [*pieces, path]
    # A pruning method and a trainer layered on top of an experiment, as the experiment headers suggest.
    jobs["experiments/blip2_opt27b_vqav2+pruning/sparsegpt+trainer/ddp"] = [
        CONFIGS / "experiments" / "blip2_opt27b_vqav2.yaml",
        layer("pruning", "sparsegpt"),
        layer("trainer", "ddp"),
    ]
    return jobs


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def merged(files: list[Path]) -> dict[str, Any]:
    """The sections of ``files`` merged as LightningCLI merges ``-c`` files (later keys win, mappings merge)."""

    def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in update.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict[str, Any] = {}
    for path in files:
        config = merge(config, load(path))
    return config


# ----------------------------------------------------------------------------------------------- tiny models


CORPUS = [
    "a dog runs on the green grass",
    "two cats sleeping on a couch",
    "what color is the bus?",
    "red blue two yes no",
    "Question: Short answer:",
    "a photo of a picture of",
] * 3


def _save_tiny_models(root: Path) -> dict[str, Path]:
    """One ``save_pretrained`` directory per family (model + processor or tokenizer), as a hub model looks."""

    def tokenizer(template: str) -> Any:
        return train_tokenizer(CORPUS, vocab_size=100, template=template)

    blip_images = BlipImageProcessor(size={"height": 32, "width": 32})
    dirs = {family: root / family for family in sorted(set(HUB_MODELS.values()))}
    for family, template in (("blip2_opt", "bos"), ("blip2_t5", "eos")):
        tiny_model(family).save_pretrained(dirs[family])
        Blip2Processor(blip_images, tokenizer(template), num_query_tokens=4).save_pretrained(dirs[family])
    itm_config = tiny_config("blip2_opt")
    itm_config.qformer_config.use_qformer_text_input = True
    Blip2ForImageTextRetrieval(itm_config).save_pretrained(dirs["blip2_itm"])
    Blip2Processor(blip_images, tokenizer("cls_sep"), num_query_tokens=4).save_pretrained(dirs["blip2_itm"])
    tiny_model("blip").save_pretrained(dirs["blip"])
    BlipProcessor(blip_images, tokenizer("cls_sep")).save_pretrained(dirs["blip"])
    tiny_model("vilt").save_pretrained(dirs["vilt"])
    vqa_config = tiny_config("vilt", num_labels=2)
    vqa_config.id2label, vqa_config.label2id = {0: "no", 1: "yes"}, {"no": 0, "yes": 1}  # the answer vocabulary
    ViltForQuestionAnswering(vqa_config).save_pretrained(dirs["vilt_vqa"])
    vilt_images = ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8)
    for family in ("vilt", "vilt_vqa"):
        ViltProcessor(vilt_images, tokenizer("cls_sep")).save_pretrained(dirs[family])
    tiny_model("clip").save_pretrained(dirs["clip"])
    clip_images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(clip_images, tokenizer("bos_eos")).save_pretrained(dirs["clip"])
    for family, template in (("t5", "eos"), ("llama", "bos")):
        tiny_model(family).save_pretrained(dirs[family])
        tokenizer(template).save_pretrained(dirs[family])
    for family in sorted(PROCESSOR_TEMPLATES.keys() & dirs.keys()):  # encoded by a processor of their own
        config, processor = tiny_processor(family, CORPUS)
        HF_FAMILIES[family](config).save_pretrained(dirs[family])
        processor.save_pretrained(dirs[family])
    return dirs


def overrides(files: list[Path], model_dirs: dict[str, Path], tmp: Path) -> list[str]:
    """CPU, tiny-model and empty-data overrides of one run (the model section decides the tiny model). The
    configs' relative ``default_root_dir`` is kept: the driver runs in ``tmp``, and instantiating writes nothing."""
    init = merged(files)["model"]["init_args"]
    if init.get("timm_model"):
        model = ["--model.init_args.pretrained=false", f"--model.init_args.model_config={json.dumps(TINY_TIMM)}"]
    else:
        model = [f"--model.init_args.pretrained={model_dirs[HUB_MODELS[init['pretrained']]]}"]
    return [
        *model,
        f"--data.init_args.data_dir={tmp / 'data'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
    ]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every composition instantiated, in one subprocess: job name -> the driver's summary (or error)."""
    tmp = tmp_path_factory.mktemp("configs")
    model_dirs = _save_tiny_models(tmp / "models")
    jobs = {}
    for name, files in compositions().items():
        jobs[name] = [arg for path in files for arg in ("-c", str(path))] + overrides(files, model_dirs, tmp)
    (tmp / "jobs.json").write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp / "jobs.json"), str(tmp / "results.json")],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(compositions()))
def test_config_instantiates(built: dict[str, Any], name: str) -> None:
    result = built[name]
    assert result["ok"], f"{name}: {result.get('error')}\n{result.get('trace', '')[-2500:]}"
    assert result["collator_linked"], "the task's collator must be linked into the DataModule"
    config = merged(compositions()[name])
    assert result["task"] == config["model"]["class_path"].rsplit(".", 1)[-1]
    assert result["data"] == config["data"]["class_path"].rsplit(".", 1)[-1]
    assert "ECoFLaPPruning" in result["trainer"]["callbacks"]


def test_every_config_is_covered() -> None:
    """Each YAML under configs/ (demo aside) is an experiment or a layered piece used by some composition."""
    used = {path for files in compositions().values() for path in files}
    for path in yaml_files():
        kind = path.relative_to(CONFIGS).parts[0]
        assert kind in (*LAYERS, "experiments"), f"{path}: configs/ holds only {LAYERS} and experiments/"
        assert path in used, f"{path} is not instantiated by any composition: name it in a model file's header"


def test_model_files_name_their_data() -> None:
    for model, datas in model_data_pairs().items():
        assert datas, f"model/{model}.yaml: say which data/ files it pairs with ('Pair with data/x.yaml')"
        assert all(layer("data", data).is_file() for data in datas), (model, datas)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_sections(path: Path) -> None:
    """Layered pieces hold only their own section; experiments are whole runs writing under runs/<name>."""
    config = load(path)
    kind = path.relative_to(CONFIGS).parts[0]
    if kind == "experiments":
        assert {"model", "data", "pruning", "trainer"} <= set(config)
        assert config["trainer"]["default_root_dir"] == f"runs/{path.stem}"
    elif kind == "model":
        assert set(config) == {"model", "trainer"} and set(config["trainer"]) == {"default_root_dir"}
        assert config["trainer"]["default_root_dir"] == f"runs/{path.stem}"
    else:
        assert set(config) == {kind}, f"{path} must hold only the `{kind}:` section"
    if kind == "trainer":
        assert "default_root_dir" not in config["trainer"], "trainer files layer on top of experiments"


def test_models_are_real_names() -> None:
    """Every model is a real hub name (known to stand in for a tiny family) or a registered timm tag."""
    pretrained_timm = set(timm.list_models(pretrained=True))
    for name, files in compositions().items():
        init = merged(files)["model"]["init_args"]
        if init.get("timm_model"):
            assert init["timm_model"] in pretrained_timm, name
            assert init.get("pretrained") is True, name
        else:
            assert init["pretrained"] in HUB_MODELS, f"{name}: unknown model {init['pretrained']!r}"


def test_data_dirs_are_edit_placeholders() -> None:
    for path in yaml_files():
        data = load(path).get("data")
        if data is not None:
            assert data["init_args"]["data_dir"].startswith("data/"), path
            assert "# EDIT" in path.read_text(encoding="utf-8"), f"{path}: mark data_dir with '# EDIT'"


def test_no_config_pins_the_cap_of_the_group_sparsities() -> None:
    """``max_sparsity`` is left to follow ``sparsity`` (``sparsity + 0.1``): a pinned 0.6 turned ECoFLaP into the
    uniform baseline under ``--pruning.sparsity 0.6`` (every group capped at the target) and refused 0.7."""
    for path in [*yaml_files(), *sorted((CONFIGS / "demo").glob("*.yaml"))]:
        pruning = load(path).get("pruning") or {}
        assert pruning.get("max_sparsity") is None, f"{path}: leave max_sparsity null (sparsity + 0.1)"


def test_pruning_files_fully_define_their_method(built: dict[str, Any]) -> None:
    """Layering a pruning file replaces the method: every value it sets reaches the callback's config."""
    for path in sorted((CONFIGS / "pruning").glob("*.yaml")):
        section = load(path)["pruning"]
        result = built[f"pruning/{path.stem}"]
        assert result["ok"], result.get("error")
        for key, value in section.items():
            if key == "stages":
                assert result["stages"] == value
            elif value is not None:
                assert result["pruning"][key] == value, (path.name, key)
    layered = built["experiments/blip2_opt27b_vqav2+pruning/sparsegpt+trainer/ddp"]
    assert layered["pruning"]["method"] == "sparsegpt" and layered["pruning"]["importance"] == "uniform"
    assert layered["trainer"]["strategy"] == "DDPStrategy"
    assert layered["trainer"]["default_root_dir"] == "runs/blip2_opt27b_vqav2", "trainer files keep the run's folder"


ECOFLAP = {"sparsity": 0.5, "max_sparsity": 0.6, "method": "wanda", "granularity": "block", "fine_samples": 128}


@pytest.mark.parametrize("stem", sorted(p.stem for p in (CONFIGS / "experiments").glob("*.yaml")))
def test_experiment_settings(built: dict[str, Any], stem: str) -> None:
    """The paper's settings (docs/algorithm.md §5) in each experiment."""
    result = built[f"experiments/{stem}"]
    assert result["ok"], result.get("error")
    assert result["trainer"]["default_root_dir"] == f"runs/{stem}"
    pruning, task = result["pruning"], result["task_attributes"]
    assert {key: pruning[key] for key in ECOFLAP} == ECOFLAP
    if stem.endswith("first_order"):
        assert (pruning["importance"], pruning["score"], pruning["aggregate"]) == ("first_order", "grad_mag_abs", "sum")
        assert pruning["coarse_samples"] == 128
    else:
        assert (pruning["importance"], pruning["score"], pruning["coarse_samples"]) == ("zeroth_order", "grad_only", 32)
        assert pruning["aggregate"] == ("avg" if stem.startswith("flant5") else "sum")
    if stem.startswith("blip2_") and result["task"] == "VQATask":
        assert task["prompt"] == "Question: {} Short answer:"
        assert task["generation_kwargs"]["num_beams"] == 5 and task["generation_kwargs"]["max_new_tokens"] == 10
    finetune = {  # docs/algorithm.md §5: epochs, learning rate
        "vilt_nlvr2_finetune": (15, 3e-6),
        "blip_coco_caption_finetune": (5, 1e-5),
        "blip_vqav2_finetune": (10, 2e-5),
        "blip_flickr30k_finetune": (12, 1e-5),
    }
    if stem in finetune:
        assert (result["trainer"]["max_epochs"], task["learning_rate"]) == finetune[stem]
        assert task["weight_decay"] == 0.05
        assert "ModelCheckpoint" in result["trainer"]["callbacks"]


@pytest.mark.parametrize("stem", sorted(p.stem for p in (CONFIGS / "experiments").glob("*_finetune.yaml")))
def test_finetune_experiments_save_every_run_in_one_folder_with_a_last_checkpoint(stem: str) -> None:
    """`--ckpt_path last` resumes the previous run: Lightning looks for `last.ckpt` in the ModelCheckpoint's folder,
    which without `dirpath` is a new logger version folder each run."""
    config = yaml.safe_load((CONFIGS / "experiments" / f"{stem}.yaml").read_text(encoding="utf-8"))
    (checkpoints,) = (c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ModelCheckpoint"))
    assert checkpoints["init_args"]["save_last"] is True
    assert checkpoints["init_args"]["dirpath"] == f"runs/{stem}/checkpoints"
