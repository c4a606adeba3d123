"""Token methods inside the UNet's transformer blocks: ToMe, SiTo, DaTo (remove tokens and restore
them) and ToDo (downsample the keys and values of self-attention).

Each method is one file: a frozen dataclass of its settings with a `plan` for one block (the
contract is in method.py). METHODS is the registry the tools build their flags and method specs
from; adding a method is one file and one entry here.

    from prune import token_method
    settings = token_method("sito", ratio=0.5)   # = prune.sito.SiTo(ratio=0.5)

A leaf, like cache/: it imports no other package of this project.
"""
from dataclasses import fields

from . import dato, sito, todo, tome
from .dato import BASE_TOKENS, DaTo
from .method import LAYERS, MAX_DOWNSAMPLES, CellMethod, TokenMethod
from .sito import SiTo
from .todo import ToDo
from .tokens import RECOVER, max_ratio
from .tome import ToMe

METHODS = {cls.name: cls for cls in (ToMe, SiTo, DaTo, ToDo)}

# Each field's default, as its method declares it: old schedule files carried every method's fields,
# the other methods' at these values (from_record drops them).
DEFAULTS = {f.name: f.default for cls in METHODS.values() for f in fields(cls)}


def token_method(name, **settings):
    """The settings of the method `name` (a key of METHODS) with `settings` changed; a setting the
    method does not have is refused, naming the methods that have it."""
    if name not in METHODS:
        raise ValueError(f"unknown token method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    own = {f.name for f in fields(cls)}
    for key in settings:
        if key not in own:
            owners = [n for n, c in METHODS.items() if key in {f.name for f in fields(c)}]
            raise ValueError(f"{key} is not a setting of {name}"
                             + (f" but of {', '.join(owners)}" if owners else "")
                             + f"; {name}'s settings: {', '.join(sorted(own))}")
    return cls(**settings)


def as_record(settings):
    """Settings as a JSON-ready dict, the method name under "method" (schedule files, metadata)."""
    record = {"method": settings.name}
    for f in fields(settings):
        value = getattr(settings, f.name)
        record[f.name] = list(value) if isinstance(value, tuple) else value
    return record


def from_record(record):
    """The settings a dict of as_record describes. Fields of other methods (old schedule files held
    every method's) are dropped when they hold the value every file had."""
    record = dict(record)
    name = record.pop("method", None)
    own = {f.name for f in fields(METHODS[name])} if name in METHODS else set()
    for key, value in list(record.items()):
        if key not in own and key in DEFAULTS and value == DEFAULTS[key]:
            del record[key]
    return token_method(name, **{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in record.items()})


__all__ = ["METHODS", "TokenMethod", "CellMethod", "ToMe", "SiTo", "DaTo", "ToDo", "token_method",
           "as_record", "from_record", "LAYERS", "RECOVER", "MAX_DOWNSAMPLES", "BASE_TOKENS",
           "max_ratio", "tome", "sito", "dato", "todo"]
