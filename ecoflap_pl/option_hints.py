"""Did-you-mean hints for option names the ``ecoflap`` parser refused (a misspelt key in a YAML file or on the
command line), so that the error says which option was meant and not only which was refused."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from argparse import ArgumentParser

_UNKNOWN_ARGUMENT = re.compile(r"unrecognized arguments: --([\w.]+)", re.IGNORECASE)
_UNKNOWN_KEY = re.compile(r"does not accept option '([\w.]+)'")
_UNKNOWN_CLASS_ARGUMENT = re.compile(r"given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted")


def unknown_option_hint(message: str, parser: ArgumentParser) -> str | None:
    """``HINT: did you mean ...?`` for the option a parser error refused, or None when no option of the same section
    (``pruning.``, ``trainer.``, a class's arguments) has a close name.

    Args:
        message: the parser's error message.
        parser: the ``ecoflap`` parser (with its subcommand parsers), whose options are the valid names.
    """
    found = _UNKNOWN_ARGUMENT.search(message) or _UNKNOWN_KEY.search(message)
    if found:
        given, known = found.group(1), _parser_options(parser)
    else:
        found = _UNKNOWN_CLASS_ARGUMENT.search(message)
        if found is None:
            return None
        given, known = found.group(2), _init_arguments(found.group(1))
    prefix, _, name = given.rpartition(".")
    siblings = {option.rpartition(".")[2]: option for option in known if option.rpartition(".")[0] == prefix}
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.75)
    return f"HINT: did you mean '{siblings[close[0]]}'?" if close else None


def _parser_options(parser: ArgumentParser) -> list[str]:
    """Every dotted option name of ``parser`` and of its subcommand parsers, without the leading dashes."""
    parsers = [parser]
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is not None:
        parsers += list(subcommands._name_parser_map.values())
    names = {option.lstrip("-") for each in parsers for action in each._actions for option in action.option_strings}
    return sorted(name for name in names if len(name) > 1)


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
