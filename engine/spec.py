"""Probe specs: the probes of a run written down as JSON (with their arrays beside it) and built
again, identical, for another run, another seed or another model.

A spec is what TF Playground keeps in its URL, for arbitrary PyTorch models: every probe's
class and the arguments it was built with, grids, fixed batches, hook patterns, schedules.
``probes.json`` is readable and editable; the arrays the arguments hold (data, labels, batches)
are in ``probes.npz`` beside it. A Monitor with a run directory writes both there, so every
recorded run can be probed again the same way::

    probes = probescope.load_probes("runs/seed0")          # the probes of that run
    with probescope.Monitor(model, probes, run_dir="runs/seed1"): ...

What cannot be written down (a lambda, a function defined inside another, a loss module object)
is marked missing with a description; ``load_probes(..., overrides={probe: {argument: value}})``
supplies it, and can change any other argument too. Loading imports the modules a spec names
(probe classes, loss functions, metrics), as unpickling would: load specs you trust.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probescope.run import atomic_write

log = logging.getLogger("probescope")

FORMAT = "probescope-probes"
VERSION = 1
SPEC_FILE = "probes.json"


class Reproducible:
    """Remembers the arguments its most derived ``__init__`` was called with, defaults filled
    in, so that a spec can write the object down and build it again.

    Subclasses whose arguments are consumed or reinterpreted when built (an iterator, a path
    that is read once) override ``spec_arguments`` to return what rebuilds them."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_spec_arguments" not in self.__dict__:  # the outermost call names the class built
                try:
                    bound = signature.bind(self, *args, **kw)
                except TypeError as err:  # as Python would say it, naming the class
                    raise TypeError(f"{type(self).__name__}(): {err}") from None
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                self._spec_arguments = {k: _on_host(v) for k, v in arguments.items()}
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def spec_arguments(self) -> dict[str, Any]:
        """The arguments that build this object again."""
        return dict(self.__dict__.get("_spec_arguments", {}))


def _on_host(value):
    """``value`` with its device tensors copied to the host: a spec must not keep a caller's
    batch alive in device memory for as long as the probe lives."""
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value.detach().cpu()
    if type(value) in (tuple, list):
        return type(value)(_on_host(v) for v in value)
    if type(value) is dict:
        return {k: _on_host(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Missing:
    """An argument a spec could not write down: where it was and what it was."""

    probe: str
    argument: str
    what: str


def save_probes(probes: Iterable, path: str | os.PathLike) -> list[Missing]:
    """Write ``probes`` to ``path`` (a ``.json`` file, or a directory to hold ``probes.json``)
    and their arrays to the ``.npz`` of the same name; return what could not be written down
    (also logged, once, with how to supply it when loading)."""
    path, missing = write_spec(probes, path)
    if missing:
        log.warning(
            "probe spec %s: %s cannot be written down; load_probes(..., overrides=%s) supplies %s",
            path,
            describe_missing(missing),
            _overrides_hint(missing),
            "it" if len(missing) == 1 else "them",
        )
    return missing


def write_spec(probes: Iterable, path: str | os.PathLike) -> tuple[Path, list[Missing]]:
    """``save_probes`` without the warning: the spec file written and what it lacks."""
    path = _spec_path(path, writing=True)
    document, arrays, missing = encode_probes(probes)
    document["arrays"] = path.with_suffix(".npz").name if arrays else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if arrays:
        atomic_write(path.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    else:
        path.with_suffix(".npz").unlink(missing_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(document, indent=2).encode()))
    return path, missing


def describe_missing(missing: Iterable[Missing]) -> str:
    """``probe.argument (what it was)``, for each argument a spec could not write down."""
    return "; ".join(f"{m.probe}.{m.argument} ({m.what})" for m in missing)


def load_probes(path: str | os.PathLike, *, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list:
    """The probes written at ``path`` (a run directory, a directory holding ``probes.json``, or a
    spec file), built again. ``overrides`` maps a probe's name to arguments that replace the
    spec's: the ones it could not write down, or any other (``{"grid": {"resolution": 512}}``)."""
    path = _spec_path(path, writing=False)
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a probescope probe spec (its format is {document.get('format')!r})")
    if document.get("version", 0) > VERSION:
        raise ValueError(
            f"{path} was written by a newer probescope (spec version {document['version']}, "
            f"this one reads {VERSION}); upgrade probescope"
        )
    arrays: Mapping[str, np.ndarray] = {}
    if document.get("arrays"):
        with np.load(path.with_name(document["arrays"]), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    return decode_probes(document, arrays, overrides or {}, source=str(path))


def encode_probes(probes: Iterable) -> tuple[dict, dict[str, np.ndarray], list[Missing]]:
    """``probes`` as a JSON document, the arrays it refers to, and what it could not encode."""
    encoder = _Encoder()
    entries = []
    for probe in probes:
        encoder.probe = probe.name
        entries.append(
            {
                "name": probe.name,
                "kind": probe.kind,
                "class": encoder.importable(type(probe), "class"),
                "arguments": encoder.arguments(probe.spec_arguments(), probe.name),
            }
        )
    return {"format": FORMAT, "version": VERSION, "probes": entries}, encoder.arrays, encoder.missing


def decode_probes(
    document: dict, arrays: Mapping[str, np.ndarray], overrides: Mapping[str, Mapping[str, Any]], source: str
) -> list:
    """The probes of a spec document (see ``encode_probes``), built with ``overrides``."""
    from probescope.probes.base import Probe

    names = [entry["name"] for entry in document["probes"]]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"load_probes: overrides name probes {unknown} that {source} does not hold ({names})"
        )
    decoder = _Decoder(arrays, source)
    missing: list[Missing] = []
    plans = []
    for entry in document["probes"]:
        name = entry["name"]
        given = dict(overrides.get(name, {}))
        cls = decoder.importable(entry["class"], f"probe {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, Probe)):
            raise ValueError(f"load_probes: {source} names {entry['class']} for probe {name!r}, not a Probe")
        parameters = inspect.signature(cls.__init__).parameters
        bad = sorted(set(given) - set(parameters) - {"self"})
        if bad:
            raise ValueError(
                f"load_probes: {cls.__name__} {name!r} has no argument {bad}; "
                f"its arguments are {[p for p in parameters if p != 'self']}"
            )
        arguments = {}
        for key, node in entry["arguments"].items():
            if key in given:
                continue
            gap = _find_missing(node)
            if gap is not None:
                missing.append(Missing(name, key, gap))
            else:
                arguments[key] = decoder.value(node)
        plans.append((cls, {**arguments, **given}))
    if missing:
        raise ValueError(
            f"load_probes: {source} could not write down "
            + describe_missing(missing)
            + f"; supply {'it' if len(missing) == 1 else 'them'} with overrides={_overrides_hint(missing)}"
        )
    return [build(cls, arguments) for cls, arguments in plans]


def build(cls: type, arguments: Mapping[str, Any]):
    """``cls(**arguments)``, with positional-only and variadic parameters passed as such."""
    parameters = inspect.signature(cls.__init__).parameters
    P = inspect.Parameter
    # Before a filled *args, the parameters that may be positional must be.
    positional = {P.POSITIONAL_ONLY}
    if any(p.kind is P.VAR_POSITIONAL and arguments.get(n) for n, p in parameters.items()):
        positional.add(P.POSITIONAL_OR_KEYWORD)
    args, kwargs = [], {}
    for name, parameter in parameters.items():
        if name == "self" or name not in arguments:
            continue
        value = arguments[name]
        if parameter.kind in positional:
            args.append(value)
        elif parameter.kind is P.VAR_POSITIONAL:
            args.extend(value)
        elif parameter.kind is P.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return cls(*args, **kwargs)


def spec_digest(path: str | os.PathLike) -> str:
    """A fingerprint of a spec's content (its JSON and its arrays' values, not the files' bytes):
    two runs probed the same way have the same digest."""
    path = _spec_path(path, writing=False)
    document = json.loads(path.read_text())
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode())
    if document.get("arrays"):
        with np.load(path.with_name(document["arrays"]), allow_pickle=False) as npz:
            for key in sorted(npz.files):
                array = np.ascontiguousarray(npz[key])
                digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
                digest.update(array.tobytes())
    return digest.hexdigest()


def describe_spec(path: str | os.PathLike) -> str:
    """A readable listing of a spec: each probe's class and arguments, arrays as shapes."""
    path = _spec_path(path, writing=False)
    document = json.loads(path.read_text())
    shapes: dict[str, tuple[str, list[int]]] = {}
    if document.get("arrays"):
        with np.load(path.with_name(document["arrays"]), allow_pickle=False) as npz:
            shapes = {key: (str(npz[key].dtype), list(npz[key].shape)) for key in npz.files}

    def show(node) -> str:
        if isinstance(node, list):
            return "[" + ", ".join(show(v) for v in node) + "]"
        if not isinstance(node, dict):
            return json.dumps(node)
        if "$array" in node:
            dtype, shape = shapes.get(node["$array"], ("?", "?"))
            return f"array {dtype}{shape}"
        if "$tensor" in node:
            return f"tensor {node['dtype']}{shapes.get(node['$tensor'], ('', '?'))[1]}"
        if "$tuple" in node:
            return "(" + ", ".join(show(v) for v in node["$tuple"]) + ")"
        if "$object" in node:
            cls = node["$object"].rpartition(":")[2]
            return f"{cls}(" + ", ".join(f"{k}={show(v)}" for k, v in node["arguments"].items()) + ")"
        if "$callable" in node:
            return node["$callable"]
        if "$json" in node:
            return f"{node['$json'].rpartition(':')[2]}(...)"
        if "$missing" in node:
            return f"<missing: {node['$missing']}>"
        if "$float" in node:
            return node["$float"]
        inner = node.get("$dict", node)
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in inner.items()) + "}"

    lines = [f"{path}: {len(document['probes'])} probes"]
    for entry in document["probes"]:
        cls = entry["class"]
        cls = cls["$missing"] if isinstance(cls, dict) else cls
        lines.append(f"  {entry['name']} ({entry['kind']}): {cls}")
        for key, node in entry["arguments"].items():
            lines.append(f"    {key} = {show(node)}")
    return "\n".join(lines)


# ---- encoding -------------------------------------------------------------------------------
class _Encoder:
    """JSON for values; arrays set aside under the path of the argument that held them."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.missing: list[Missing] = []
        self.probe = ""

    def arguments(self, arguments: Mapping[str, Any], where: str) -> dict:
        return {key: self.value(value, f"{where}/{key}") for key, value in arguments.items()}

    def value(self, value, where: str):
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, np.generic):
            return self.value(value.item(), where)
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            self.arrays[where] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            return {"$tensor": where, "dtype": str(t.dtype).removeprefix("torch.")}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                return self.gap(where, f"an array of Python objects {value.shape}")
            self.arrays[where] = value
            return {"$array": where}
        if isinstance(value, Reproducible):
            return {
                "$object": self.importable(type(value), where),
                "arguments": self.arguments(value.spec_arguments(), where),
            }
        if isinstance(value, tuple):
            return {"$tuple": [self.value(v, f"{where}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.value(v, f"{where}/{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            encoded = {k: self.value(v, f"{where}/{k}") for k, v in value.items()}
            return {"$dict": encoded} if any(k.startswith("$") for k in encoded) else encoded
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if callable(getattr(value, "to_json", None)) and callable(getattr(type(value), "from_json", None)):
            return {"$json": self.importable(type(value), where), "value": value.to_json()}
        if callable(value):
            path = _import_path(value)
            return {"$callable": path} if path else self.gap(where, _what(value))
        return self.gap(where, _what(value))

    def importable(self, obj, where: str):
        path = _import_path(obj)
        return path if path else self.gap(where, f"{_what(obj)}, not importable")

    def gap(self, where: str, what: str) -> dict:
        argument = where.split("/")[1] if "/" in where else where
        self.missing.append(Missing(self.probe, argument, what))
        return {"$missing": what}


def _resolve(path: str):
    """The object ``module:qualname`` names (ImportError or AttributeError if none)."""
    module, _, qualname = path.partition(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _import_path(obj) -> str | None:
    """``module:qualname`` that imports back to ``obj`` itself, or None."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        return path if _resolve(path) is obj else None
    except (ImportError, AttributeError):
        return None


def _what(value) -> str:
    """A short description of a value a spec cannot hold, naming where it was defined."""
    code = getattr(value, "__code__", None)
    if code is not None:
        kind = "a lambda" if value.__name__ == "<lambda>" else f"function {value.__qualname__}"
        return f"{kind} at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    if isinstance(value, type):
        return f"class {value.__qualname__}"
    return f"a {type(value).__qualname__} object"


def _overrides_hint(missing: list[Missing]) -> str:
    by_probe: dict[str, list[str]] = {}
    for m in missing:
        by_probe.setdefault(m.probe, []).append(f"{m.argument!r}: ...")
    return "{" + ", ".join(f"{p!r}: {{{', '.join(args)}}}" for p, args in by_probe.items()) + "}"


# ---- decoding -------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, arrays: Mapping[str, np.ndarray], source: str):
        self.arrays, self.source = arrays, source

    def array(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise ValueError(f"load_probes: {self.source} refers to array {key!r}, which its .npz lacks")
        return self.arrays[key].copy()

    def importable(self, path, what: str):
        if isinstance(path, dict) and "$missing" in path:
            raise ValueError(
                f"load_probes: {self.source} holds {what} as {path['$missing']}; define it at the top "
                "level of a module to write it down"
            )
        try:
            return _resolve(path)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"load_probes: cannot import {path} for {what} ({err})") from None

    def value(self, node):
        if isinstance(node, list):
            return [self.value(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$array" in node:
            return self.array(node["$array"])
        if "$tensor" in node:
            return torch.from_numpy(self.array(node["$tensor"])).to(getattr(torch, node["dtype"]))
        if "$tuple" in node:
            return tuple(self.value(v) for v in node["$tuple"])
        if "$float" in node:
            return float(node["$float"])
        if "$object" in node:
            cls = self.importable(node["$object"], "an argument")
            if not (isinstance(cls, type) and issubclass(cls, Reproducible)):
                raise ValueError(
                    f"load_probes: {self.source} names {node['$object']}, which specs do not build"
                )
            return build(cls, {k: self.value(v) for k, v in node["arguments"].items()})
        if "$json" in node:
            return self.importable(node["$json"], "an argument").from_json(node["value"])
        if "$callable" in node:
            return self.importable(node["$callable"], "an argument")
        inner = node.get("$dict", node)
        return {k: self.value(v) for k, v in inner.items()}


def _find_missing(node) -> str | None:
    """The description of the first value a spec could not write down inside ``node``."""
    if isinstance(node, list):
        return next((m for m in map(_find_missing, node) if m is not None), None)
    if isinstance(node, dict):
        if "$missing" in node:
            return node["$missing"]
        return next((m for m in map(_find_missing, node.values()) if m is not None), None)
    return None


# ---- files ----------------------------------------------------------------------------------
def _spec_path(path: str | os.PathLike, *, writing: bool) -> Path:
    path = Path(path)
    if path.suffix == ".json":
        if not writing and not path.exists():
            raise FileNotFoundError(f"no probe spec at {path}")
        return path
    if writing or (path / SPEC_FILE).exists():
        return path / SPEC_FILE
    if (path / "run.json").exists():
        raise FileNotFoundError(f"{path} is a run recorded without a probe spec (an older probescope)")
    raise FileNotFoundError(f"no probe spec at {path} (neither a .json file nor a folder with {SPEC_FILE})")
