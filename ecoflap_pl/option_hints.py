"""Did-you-mean hints for option names the ``ecoflap`` parser refused (a misspelt key in a YAML file or on the
command line), so that the error says which option was meant and not only which was refused."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from argparse import ArgumentParser

_UNKNOWN_ARGUMENT = re.compile(r"unrecognized arguments: --([\w.]+)", re.IGNORECASE)
_UNKNOWN_KEY = re.compile(r"(?:Subcommand '(\w+)' )?does not accept option '([\w.]+)'")
_UNKNOWN_CLASS_ARGUMENT = re.compile(r"given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted")


_OTHER_CODE_NAMES = {
    "sparsity_ratio": "sparsity",
    "sparsity_type": "structure",
    "prune_method": "method",
    "nsamples": "fine_samples",
}
"""Arguments of Wanda's ``main.py`` that its users type out of habit, and the pruning options that do the same here."""


_PARSER_KEY = re.compile(r'Parser key "(\w+)"')
_EXPECTED_MAPPING = "Expected a <class 'dict'>"
_MAPPING_EXAMPLES = {
    "max_memory": "--model.init_args.max_memory '{cpu: 10GB}' (GPUs by number: '{0: 20GiB, cpu: 60GiB}')",
}
"""Mapping options of the tasks, with the form a command line gives one."""


def mapping_option_hint(message: str) -> str | None:
    """``HINT:`` with the mapping form of an option that takes a mapping and was given something else (``max_memory
    10GB``: the parser only says ``Expected a <class 'dict'>``), or None for any other error."""
    where = message.find(_EXPECTED_MAPPING)
    keys = _PARSER_KEY.findall(message[:where]) if where >= 0 else []
    option = keys[-1] if keys else None  # the innermost key before the complaint: the option given
    if option not in _MAPPING_EXAMPLES:
        return None
    return f"HINT: `{option}` is a mapping, e.g. {_MAPPING_EXAMPLES[option]}."


_UNKNOWN_CLASS = re.compile(
    r"""(?:Parser key "|--)(model|data)\b.*?(?:Expected a dot import path string: ([\w.]+)"""
    r"|given class_path '([\w.]+)':\s*(?:module '[\w.]+' has no attribute|No module named))",
    re.DOTALL,
)
_CLASS_PACKAGES = {
    "model": ("ecoflap_pl.tasks.base.EcoflapTask", ("ecoflap_pl.tasks", "ecoflap_pl.demo.tasks")),
    "data": ("ecoflap_pl.datamodules.EcoflapDataModule", ("ecoflap_pl.datamodules", "ecoflap_pl.demo.datamodules")),
}
"""For ``model`` and ``data``: the base class every choice derives from, and the packages that hold the choices."""


def unknown_class_hint(message: str) -> str | None:
    """``HINT:`` for a task or DataModule class that could not be found (``--model VQATsk``, a misspelt ``class_path``,
    ``--model.help`` of a class whose module is not imported): the closest class name, with its import path, and the
    classes there are (the parser names only the path it could not import); None for any other error."""
    found = _UNKNOWN_CLASS.search(message)
    if found is None:
        return None
    section, given = found.group(1), found.group(2) or found.group(3)
    per_package = _public_classes(section)
    by_name = {name: f"{package}.{name}" for package, names in per_package.items() for name in names}
    close = difflib.get_close_matches(given.rpartition(".")[2], list(by_name), n=1, cutoff=0.8)
    meant = f"did you mean '{by_name[close[0]]}'? " if close else ""
    listing = "; ".join(f"{package}.{{{', '.join(names)}}}" for package, names in per_package.items())
    return f"HINT: {meant}The {_CLASS_KINDS[section]}: {listing} (`--{section}.help PATH` lists one's arguments)."


_CLASS_KINDS = {"model": "tasks", "data": "DataModules"}


def _public_classes(section: str) -> dict[str, list[str]]:
    """The classes ``section`` (``model`` or ``data``) takes, by package: those of its packages that derive from its
    base class, each under the package that exports it."""
    base_path, packages = _CLASS_PACKAGES[section]
    module_name, _, base_name = base_path.rpartition(".")
    base = getattr(importlib.import_module(module_name), base_name)
    found: dict[str, list[str]] = {}
    for package in packages:
        module = importlib.import_module(package)
        for name in sorted(getattr(module, "__all__", dir(module))):
            value = getattr(module, name, None)
            if inspect.isclass(value) and issubclass(value, base) and value is not base:
                if value.__module__.startswith(package):  # not a class the package imports from another one
                    found.setdefault(package, []).append(name)
    return found


_BEFORE_SUBCOMMAND = re.compile(r"Option '[\w.]+' is not accepted before subcommand '(\w+)'")


def config_before_subcommand_hint(message: str) -> str | None:
    """``HINT:`` for a config given before the subcommand (``ecoflap -c FILE validate``), whose options the parser
    refused one by one; None for any other error."""
    found = _BEFORE_SUBCOMMAND.search(message)
    if found is None:
        return None
    subcommand = found.group(1)
    return (
        f"HINT: give the config after the subcommand, `ecoflap {subcommand} -c FILE`: before it, a config must hold "
        f"each subcommand's settings under the subcommand's name (`{subcommand}:`)."
    )


_NO_SUBCOMMAND = re.compile(r'expected "subcommand" to be one of')
_REQUIRED = re.compile(r"the following arguments are required: ([\w., ]+)")
_DEMO_RUN = "`ecoflap validate -c configs/demo/blip2_vqa.yaml` (configs/README.md lists the configs)"


def missing_input_hint(message: str) -> str | None:
    """``HINT:`` for a command line that names no subcommand, or a run without its task (``model:``) or data
    (``data:``): the parser names only what is missing, not how a run is given (a config); None for any other error."""
    if _NO_SUBCOMMAND.search(message):
        return f"HINT: name a subcommand and a config, e.g. {_DEMO_RUN}; `ecoflap --help` lists the subcommands."
    required = _REQUIRED.search(message)
    missing = [name.strip().rpartition(".") for name in required.group(1).split(",")] if required else []
    if not missing or any(name not in ("model", "data") for _, _, name in missing):
        return None
    subcommand = missing[0][0] or "validate"
    return (
        "HINT: a run needs its task (`model:`) and its data (`data:`): give a config that names both, e.g. "
        f"{_DEMO_RUN}, or add the missing section to yours (`ecoflap {subcommand} --help` lists the options)."
    )


def unknown_option_hint(message: str, parser: ArgumentParser) -> str | None:
    """``HINT: did you mean ...?`` for the option a parser error refused, or None when no option of the same section
    (``pruning.``, ``trainer.``, a class's arguments) has a close name.

    Args:
        message: the parser's error message.
        parser: the ``ecoflap`` parser (with its subcommand parsers), whose options are the valid names.
    """
    key = _UNKNOWN_KEY.search(message)
    if key is not None and key.group(1) is not None:
        subcommand, given = key.group(1), key.group(2)
        per_subcommand = _subcommand_options(parser)
        elsewhere = [name for name, options in per_subcommand.items() if given in options]
        if elsewhere:
            return _other_subcommands_option_hint(given, subcommand, elsewhere)
        return _close_option_hint(given, per_subcommand.get(subcommand, []))
    found = _UNKNOWN_ARGUMENT.search(message) or key
    if found:
        given, known = found.group(found.lastindex or 1), _parser_options(parser)
    else:
        found = _UNKNOWN_CLASS_ARGUMENT.search(message)
        if found is None:
            return None
        class_path, given = found.group(1), found.group(2)
        known = _init_arguments(class_path)
        if given in known:  # an argument of a base class that this class does not pass on
            keys = _PARSER_KEY.findall(message)
            listing = f"`--{keys[0]}.help {class_path}`" if keys else "the subcommand's --help"
            return (
                f"HINT: {class_path.rpartition('.')[2]} does not take `{given}`, though a class it derives from does: "
                f"{listing} lists the arguments it takes."
            )
        owner = f"an argument of {class_path.rpartition('.')[2]}"
        return _close_option_hint(given, known) or _other_section_hint(given, _parser_options(parser), owner)
    return _close_option_hint(given, known)


def _close_option_hint(given: str, known: list[str]) -> str | None:
    """``HINT: did you mean ...?`` naming the option of ``known`` in the same section as ``given`` with the closest
    name, or, for a misspelt section (``pruneing.sparsity``), the same option of the section with the closest name;
    None when none is close."""
    prefix, _, name = given.rpartition(".")
    siblings = {option.rpartition(".")[2]: option for option in known if option.rpartition(".")[0] == prefix}
    if _OTHER_CODE_NAMES.get(name) in siblings:
        return f"HINT: did you mean '{siblings[_OTHER_CODE_NAMES[name]]}'? ({name} is its name in Wanda's code)"
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.75)
    if close:
        return f"HINT: did you mean '{siblings[close[0]]}'?"
    sections = {option.rpartition(".")[0] for option in known if f"{option.rpartition('.')[0]}.{name}" == option}
    section = difflib.get_close_matches(prefix, sorted(sections - {""}), n=1, cutoff=0.75) if prefix else []
    if section:
        return f"HINT: did you mean '{section[0]}.{name}'?"
    return _other_section_hint(given, known)


def _other_section_hint(given: str, known: list[str], owner: str | None = None) -> str | None:
    """The hint for an option put in another section than its own: ``pruning.compare_dense`` or
    ``trainer.seed_everything`` (top-level options), ``data.init_args.sparsity`` (a pruning option; ``given`` is then
    the bare name the class refused, and ``owner`` says whose argument it is not), or a section's file holding its
    section's name again (``--pruning FILE`` of a file that starts with ``pruning:``); None when no option of
    ``known`` has that name."""
    prefix, _, name = given.rpartition(".")
    first, _, rest = prefix.partition(".")
    if first and rest == first:
        return (
            f"HINT: a file given as `--{first} FILE` holds the settings of the `{first}:` section alone; this one "
            f"names the section again: give it with -c instead (-c FILE merges a whole config)."
        )
    elsewhere = [f"'{option}'" for option in known if option.rpartition(".")[2] == name and option != given]
    if not elsewhere:
        return None
    not_here = owner or (f"an option of the `{prefix}:` section" if prefix else "a top-level option")
    return f"HINT: did you mean {' or '.join(elsewhere)}? `{name}` is not {not_here}."


def _other_subcommands_option_hint(given: str, subcommand: str, elsewhere: list[str]) -> str:
    """The hint for an option of other subcommands only, e.g. ``verbose`` (``validate``/``test``) given to ``fit``: a
    config that ``--print_config`` printed, or a run saved as ``config.yaml``, for another subcommand."""
    return (
        f"'{given}' is an option of {' and '.join(f'`{name}`' for name in elsewhere)}, not of `{subcommand}`: this "
        f"config was probably printed (--print_config) or saved (config.yaml) by another subcommand. HINT: delete its "
        f"`{given}:` line, or print the config again with `ecoflap {subcommand} ... --print_config`."
    )


def _subcommand_options(parser: ArgumentParser) -> dict[str, list[str]]:
    """Each subcommand's dotted option names, without the leading dashes (empty without subcommands)."""
    subcommands = getattr(parser, "_subcommands_action", None)
    parsers = subcommands._name_parser_map if subcommands is not None else {}
    return {name: _options(each) for name, each in parsers.items()}


def _options(parser: ArgumentParser) -> list[str]:
    names = {option.lstrip("-") for action in parser._actions for option in action.option_strings}
    return sorted(name for name in names if len(name) > 1)


def _parser_options(parser: ArgumentParser) -> list[str]:
    """Every dotted option name of ``parser`` and of its subcommand parsers, without the leading dashes."""
    names = set(_options(parser))
    for options in _subcommand_options(parser).values():
        names.update(options)
    return sorted(names)


def _init_arguments(class_path: str) -> list[str]:
    """The named ``__init__`` arguments of the class at ``class_path`` and of its bases (empty when it cannot be
    imported: the hint is a courtesy, never a second error)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: set[str] = set()
    for base in inspect.getmro(cls):
        try:
            parameters = inspect.signature(base.__dict__["__init__"]).parameters.values()
        except (KeyError, TypeError, ValueError):  # no own __init__, or a builtin without a signature
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names.update(parameter.name for parameter in parameters if parameter.kind in kinds)
    names.discard("self")
    return sorted(names)
