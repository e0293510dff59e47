"""Typed, validated params.yaml: the rules every section follows, and the shared keys.

Each stage calls `load_stage_params(<its schema>)`, e.g. `load_stage_params(FinetuneParams)`,
and gets the shared keys plus its own section as frozen dataclasses of those types.
Each stage family keeps its schema beside its code (`llmpipe/<family>/params.py`), so that
changing one family's schema reruns only that family's stages; `llmpipe.pipeline` lists them
all, and `python -m llmpipe.params` checks the whole file.
Validation is strict, because a typo in params.yaml that is silently ignored makes a DVC
experiment compare two identical runs: an unknown key, a wrong type or an out-of-range value
stops the stage with one line naming the dotted key, the value and what is allowed,
e.g. ``tokenize.vocab_size: -5 is not a positive integer``.

A schema is a frozen dataclass with the stage's section name in `SECTION`: the type
annotation gives the type, `param(<check>)` the range. No field has a default: every value
comes from params.yaml, which spells out every key, so that DVC, which tracks params.yaml and
not this file, sees every value a stage uses.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from llmpipe import layout
from llmpipe.errors import ParamsError

PARAMS_FILE = Path("params.yaml")


# --- checks: each returns True when the value is allowed, and carries the words for what is --


@dataclass(frozen=True)
class Check:
    allowed: str  # completes "<key>: <value> is not ..."
    predicate: Callable[[Any], bool]


POSITIVE_INT = Check("a positive integer", lambda v: v > 0)
NON_NEGATIVE_INT = Check("a non-negative integer", lambda v: v >= 0)
POSITIVE_NUMBER = Check("a positive number", lambda v: v > 0)
NON_NEGATIVE_NUMBER = Check("a non-negative number", lambda v: v >= 0)
OPEN_UNIT_INTERVAL = Check("a number strictly between 0 and 1", lambda v: 0 < v < 1)
UNIT_INTERVAL = Check("a number between 0 and 1", lambda v: 0 <= v <= 1)
HALF_OPEN_UNIT_INTERVAL = Check("a number in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY_MASS = Check("a number in (0, 1]", lambda v: 0 < v <= 1)
SHA256 = Check(
    "a sha256 hex digest (64 hex characters)",
    lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v.lower()),
)


def _has_scheme(value: str, schemes: tuple[str, ...]) -> bool:
    """`scheme:rest` with a known scheme and a non-empty rest."""
    scheme, sep, rest = value.partition(":")
    return scheme in schemes and sep == ":" and rest != ""


def _hf_or_dir(value: str) -> bool:
    return _has_scheme(value, ("hf",)) or (value != "" and ":" not in value)


CORPUS_SOURCE = Check(
    "a corpus source: stdlib:docstrings, stdlib:reference, hf:<dataset>[:<config>][@<revision>], "
    "url:<address> or file:<path>",
    lambda v: (
        v in ("stdlib:docstrings", "stdlib:reference") or _has_scheme(v, ("hf", "url", "file"))
    ),
)
TOKENIZER_SOURCE = Check(
    "a tokenizer: bpe, hf:<name> or a directory", lambda v: v == "bpe" or _hf_or_dir(v)
)
MODEL_SOURCE = Check(
    "a model source: scratch, hf:<name> or a directory", lambda v: v == "scratch" or _hf_or_dir(v)
)
BASE_MODEL = Check(
    "pretrain (the pipeline's own model), hf:<name> or a directory",
    lambda v: v == "pretrain" or _hf_or_dir(v),
)
GOLD_SCORER = Check(
    "vader, hf:<name> or a directory (a text-classification model)",
    lambda v: v == "vader" or _hf_or_dir(v),
)
PREFERENCE_SOURCE = Check(
    "generate, hf:<dataset>[:<config>] or file:<path>",
    lambda v: v == "generate" or _has_scheme(v, ("hf", "file")),
)


def param(check: Check) -> Any:
    return dataclasses.field(metadata={"check": check})


# Fixed prompts sampled for a look at a model (pretrain's progress samples, the report's).
@dataclass(frozen=True, kw_only=True)
class SampleParams:
    prompts: list[str]
    max_new_tokens: int = param(POSITIVE_INT)
    temperature: float = param(NON_NEGATIVE_NUMBER)
    top_k: int | None = param(POSITIVE_INT)
    top_p: float | None = param(PROBABILITY_MASS)


@dataclass(frozen=True, kw_only=True)
class SharedParams:
    seed: int = param(NON_NEGATIVE_INT)


SHARED_KEYS = tuple(f.name for f in dataclasses.fields(SharedParams))
Schema = TypeVar("Schema")


# --- validation ------------------------------------------------------------------------------


def _kind_of(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "a boolean (true/false)",
        str: "a string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, check: Check | None) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in (a for a in get_args(tp) if a is not type(None)):
            try:
                return _convert(value, arg, key, check)
            except ParamsError as e:
                last_error = e
        raise last_error
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ParamsError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{key}: {value!r} is not a non-empty list")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", check) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported type in params schema at {key}: {tp}")
    if not ok:
        raise ParamsError(f"{key}: {value!r} is not {check.allowed if check else _kind_of(tp)}")
    if check is not None and not check.predicate(value):
        raise ParamsError(f"{key}: {value!r} is not {check.allowed}")
    return value


def build(schema: type, raw: Any, prefix: str) -> Any:
    """Build the dataclass `schema` from the mapping `raw` found at dotted key `prefix`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix}: {raw!r} is not a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ParamsError(f"{prefix}.{key}: unknown key (allowed: {allowed})")
    hints = get_type_hints(schema)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            raise ParamsError(f"{key}: missing (required)")
        values[name] = _convert(raw[name], hints[name], key, f.metadata.get("check"))
    built = schema(**values)
    for name, problem in getattr(built, "cross_field_problems", list)():
        raise ParamsError(f"{prefix}.{name}: {problem}")
    return built


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    # ruamel (YAML 1.2, as DVC reads it): PyYAML would read `lr: 3e-4` as a string.
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        raw = YAML(typ="safe").load(path.read_text())
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections")
    check_sections(raw)
    return raw


def check_sections(raw: dict[str, Any]) -> None:
    known = set(layout.STAGES) | set(SHARED_KEYS)
    for key in raw:
        if key not in known:
            raise ParamsError(f"{key}: unknown key (allowed: {', '.join(sorted(known))})")


def load_stage_params(
    schema: type[Schema], path: str | Path = PARAMS_FILE
) -> tuple[SharedParams, Schema]:
    """The shared keys and the validated section of the stage whose schema is `schema`
    (e.g. FinetuneParams, whose SECTION is "finetune"); other sections are not read."""
    stage = getattr(schema, "SECTION", None)
    if stage is None:
        raise TypeError(f"{schema.__name__} is no stage's schema (it has no SECTION)")
    raw = read_params_file(path)
    if stage not in raw:
        raise ParamsError(f"{stage}: missing section in {path}")
    return shared_params(raw), build(schema, raw[stage], stage)


def shared_params(raw: dict[str, Any]) -> SharedParams:
    values = {k: raw[k] for k in SHARED_KEYS if k in raw}
    for k in SHARED_KEYS:
        if k not in values:
            raise ParamsError(f"{k}: missing (required)")
    fields = {f.name: f for f in dataclasses.fields(SharedParams)}
    return SharedParams(
        **{
            k: _convert(v, get_type_hints(SharedParams)[k], k, fields[k].metadata.get("check"))
            for k, v in values.items()
        }
    )


def flatten(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys and leaf values (lists are leaves, as DVC's -S sets them whole)."""
    items = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            items += flatten(value, f"{dotted}.")
        else:
            items.append((dotted, value))
    return items
