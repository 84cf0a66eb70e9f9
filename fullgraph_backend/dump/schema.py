"""What each JSON file of a dump holds, and the check that makes a missing or ill-typed key a
:class:`DumpError` naming the file and the key, so readers of a checked file index it freely.

A schema is a type (``str``, ``int``, ``float`` for any number, ``bool``), a dict of keys (other
keys are kept unchecked), a one-item list (a list of those), a tuple (a list of exactly those),
``Each(schema)`` (an object of any keys), ``ANY``, or ``Maybe(schema, default)``: the key may be
missing or null, and then reads as ``default`` (checked, so a dict default gets its keys filled).
"""
from __future__ import annotations

from dataclasses import dataclass


class DumpError(Exception):
    """A folder that cannot be read as a fullgraph dump."""


@dataclass(frozen=True)
class Maybe:
    schema: object
    default: object = None


@dataclass(frozen=True)
class Each:
    schema: object


ANY = object()


def checked(value: object, schema: object, file: str, where: str = "") -> object:
    """``value`` (read from ``file``) checked against ``schema``, with every ``Maybe`` default filled in."""
    if schema is ANY:
        return value
    if isinstance(schema, Maybe):
        if value is None:
            return None if schema.default is None else checked(schema.default, schema.schema, file, where)
        return checked(value, schema.schema, file, where)
    if isinstance(schema, dict):
        _expect(isinstance(value, dict), "an object", value, file, where)
        out = dict(value)
        for key, item in schema.items():
            if key not in value and not isinstance(item, Maybe):
                raise DumpError(f"{file}: {where or 'the top level'} lacks the key {key!r}")
            out[key] = checked(value.get(key), item, file, f"{where}.{key}" if where else key)
        return out
    if isinstance(schema, Each):
        _expect(isinstance(value, dict), "an object", value, file, where)
        return {k: checked(v, schema.schema, file, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(schema, (list, tuple)):
        size = f" of {len(schema)}" if isinstance(schema, tuple) else ""
        _expect(isinstance(value, list) and (not size or len(value) == len(schema)), f"a list{size}", value, file,
                where)
        items = schema if isinstance(schema, tuple) else schema * len(value)
        return [checked(v, s, file, f"{where}[{i}]") for i, (v, s) in enumerate(zip(value, items))]
    test, description = _LEAVES[schema]
    _expect(test(value), description, value, file, where)
    return value


def _expect(ok: bool, description: str, value: object, file: str, where: str) -> None:
    if not ok:
        raise DumpError(f"{file}: {where or 'the top level'} must be {description}, got {value!r:.80}")


_LEAVES = {
    str: (lambda v: isinstance(v, str), "a string"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
}

# ---- the files ----------------------------------------------------------------------------------
MANIFEST = {"format": str, "torch": Maybe(str, "?"), "depyf": Maybe([str], []),
            "graphs": [{"folder": str, "compile_id": Maybe(str)}]}
_PIECE = {"inputs": Maybe([ANY], []), "inductor": Maybe(str), "output_code": Maybe(str),
          "kv_cache_clones": Maybe([str], []), "kv_cache_copy_backs": Maybe([str], []),
          "kv_cache_copies_in_output_code": Maybe(int, 0), "auto_functionalized": Maybe(int, 0),
          **{key: Maybe(Each(int), {}) for key in ("extern_kernels", "aten_fallbacks", "custom_op_calls",
                                                    "generated_kernels")}}
_REGIONS = {"regions": Maybe([(str, int)], []), "why_not": Maybe(str), "summary": Maybe(str, "")}
GRAPH_RECORD = {"compile_id": Maybe(str), "graph_break": Maybe(str),
                "config": Maybe({"cudagraph_mode": Maybe(str, "?"), "compiler": Maybe(str, "?")}, {}),
                "pieces": Maybe([_PIECE], []), "regions": Maybe([_REGIONS], [])}
PASSES = {"passes": Maybe([{"name": str, "graph": str, "summary": Maybe(str, ""), "report": ANY}], [])}
SWAP_REPORT = {"swapped": [{"node": str, "layer_idx": int, "impl": str, "reads": [str]}],
               "left_alone": Maybe([(str, str)], [])}
CAPTURE = [{"size": Maybe(int), "kind": str, "warmup_ms": float, "capture_ms": float, "pool_mib": float}]
DYNAMO = [{"compile_id": str, "function": Maybe(str, "?"), "where": Maybe(str, "?"), "fail_type": Maybe(str),
           "fail_reason": Maybe(str), "recompile_reason": Maybe(str)}]
