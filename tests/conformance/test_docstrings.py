"""Every public function and class (``graphprune.__all__`` and the ``__all__`` of the public
modules ``quantize``, ``coding``, ``training``; the public names defined in ``deploy``, which has
no ``__all__``) has a docstring with an example (a ``>>>`` line, or an indented block under an
``Example:`` header), and a ``Raises:`` section when its source raises a graphprune error on
purpose (``raise ConfigError(...)``, ``raise unknown_name(...)``; for a class, in ``__init__`` or
``__post_init__``). Error classes need only a docstring.

``KNOWN_GAPS`` lists what is missing today (nothing): ``test_no_new_gaps`` keeps the list from
growing, and ``test_every_public_function_and_class_is_documented_with_an_example`` asserts that
there are no gaps at all.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import graphprune as gp
from graphprune import errors

PUBLIC_MODULES = ("graphprune", "graphprune.quantize", "graphprune.coding", "graphprune.deploy",
                  "graphprune.training")


def public_objects() -> dict[str, object]:
    """Qualified public name -> function or class."""
    out: dict[str, object] = {}
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        if names is None:  # no __all__: what the module itself defines without a leading _
            names = [n for n, v in vars(mod).items() if not n.startswith("_")
                     and getattr(v, "__module__", None) == modname]
        for n in names:
            obj = getattr(mod, n)
            if isinstance(obj, (types.FunctionType, type)):
                out[f"{modname}.{n}"] = obj
    return out


def _error_classes() -> set[str]:
    seen, todo = set(), [gp.GraphPruneError]
    while todo:
        c = todo.pop()
        seen.add(c.__name__)
        todo.extend(c.__subclasses__())
    return seen


def _error_factories(classes: set[str]) -> set[str]:
    """Functions of graphprune.errors that build an error to raise (``unknown_name``)."""
    return {n for n, f in vars(errors).items() if inspect.isfunction(f)
            and str(inspect.signature(f).return_annotation).strip("'\"") in classes}


ERRORS = _error_classes()
RAISES_ERROR = re.compile(r"raise\s+(?:\w+\.)*(" + "|".join(sorted(
    ERRORS | _error_factories(ERRORS))) + r")\(")
EXAMPLE_HEADER = re.compile(r"^(\s*)Examples?:\s*$")


def has_example(doc: str) -> bool:
    lines = doc.splitlines()
    if any(line.strip().startswith(">>>") for line in lines):
        return True
    for i, line in enumerate(lines[:-1]):
        m = EXAMPLE_HEADER.match(line)
        if m:
            nxt = next((x for x in lines[i + 1:] if x.strip()), "")
            if len(nxt) - len(nxt.lstrip()) > len(m.group(1)):
                return True
    return False


def _own_doc(obj: object) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not doc or (isinstance(obj, type) and doc.startswith(f"{obj.__name__}(")):
        return ""  # none, or the signature a dataclass writes when there is no docstring
    return inspect.cleandoc(doc)


def _source(fn: object) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # generated (a dataclass's __init__): nothing raised by hand
        return ""


def _raising_source(obj: object) -> str:
    if not isinstance(obj, type):
        return _source(obj)
    return "\n".join(_source(f) for k in ("__init__", "__post_init__", "__new__")
                     if inspect.isfunction(f := obj.__dict__.get(k)))


def problems(obj: object) -> list[str]:
    docs = [_own_doc(obj)]
    if isinstance(obj, type) and inspect.isfunction(obj.__dict__.get("__init__")):
        docs.append(_own_doc(obj.__init__))
    doc = "\n".join(d for d in docs if d)
    if not doc:
        return ["no docstring"]
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return []
    out = []
    if not has_example(doc):
        out.append("no example")
    if RAISES_ERROR.search(_raising_source(obj)) and "Raises:" not in doc:
        out.append("no Raises: section")
    return out


# What is missing today (name -> problems): nothing. Keep it so; an entry here needs a reason.
KNOWN_GAPS: dict[str, list[str]] = {}

PUBLIC = public_objects()


def _gaps() -> dict[str, list[str]]:
    return {n: p for n, obj in PUBLIC.items() if (p := problems(obj))}


def test_no_new_gaps():
    new = {n: p for n, p in _gaps().items() if not set(p) <= set(KNOWN_GAPS.get(n, []))}
    assert not new, f"public API without a proper docstring: {new}"


def test_every_public_function_and_class_is_documented_with_an_example():
    gaps = _gaps()
    assert not gaps, f"{len(gaps)} public names lack an example or a Raises: section: {gaps}"


def test_the_detectors():
    assert has_example(">>> f(1)") and has_example("Example:\n    y = f(x)\n")
    assert not has_example("Example: see the README") and not has_example("f(x) returns y")
    assert RAISES_ERROR.search("    raise ConfigError(f'bad')")
    assert RAISES_ERROR.search("raise unknown_name('method', n, table) from None")
    assert not RAISES_ERROR.search("raise ValueError('x')")
    assert {"ConfigError", "CodingError", "RegistryError"} <= ERRORS
    assert {"graphprune.prune", "graphprune.quantize.KMeans",
            "graphprune.training.ADMM", "graphprune.coding.encode"} <= set(PUBLIC)
    assert problems(gp.prune) == []
