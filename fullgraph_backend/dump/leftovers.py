"""What Inductor left worth a look, read from its trace folder (post-grad graph and output code).

* KV-cache clones and copy-backs: an attention op updates ``fg_kv_cache_<layer>`` in place; if
  Inductor failed to reinplace it, the post-grad graph clones the cache, mutates the clone and
  copies it back (``aten.copy_(cache, clone)``), i.e. every step copies the whole cache. A
  self-copy ``copy_(cache, cache)`` is Inductor's marker of a kept in-place update and is fine.
* ``auto_functionalized`` nodes left in the post-grad graph (a mutation not reinplaced).
* In the output code: extern kernel calls (``extern_kernels.mm``...), op calls Inductor could not
  lower (``torch.ops.<ns>.<op>``: aten fallbacks, and custom ops such as the attention impl),
  and the kernels Inductor generated.

Inductor names its inputs ``arg<i>_1`` in the order of the graph's placeholders; ``inputs``
(the placeholder names of the graph handed to Inductor) maps them back.
"""
from __future__ import annotations

import os
import re
from collections import Counter

POST_GRAD = "fx_graph_transformed.py"
OUTPUT_CODE = "output_code.py"
KV_CACHE_PREFIX = "fg_kv_cache_"

_SIGNATURE = re.compile(r"def forward\(self,?(.*?)\):", re.S)
_ARG = re.compile(r"(\w+)\s*:")
_CLONE = re.compile(r"torch\.ops\.aten\.clone\.default\((\w+)")
_COPY = re.compile(r"torch\.ops\.aten\.copy_?\.default\((\w+), (\w+)")
_AUTO_FUNCTIONALIZED = re.compile(r"torch\.ops\.higher_order\.auto_functionalized\w*\(")
_EXTERN = re.compile(r"\bextern_kernels\.(\w+)\(")
_OP_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?\(|(?<![\w.])aten\.(\w+)(?:\.(\w+))?\(")
_KERNEL_DEF = re.compile(r"^\w+ = async_compile\.(\w+)\(", re.M)


def inspect_trace(trace_dir: str, inputs: list[str]) -> dict:
    """Leftovers of one Inductor compile whose trace is in ``trace_dir``; see the module doc."""
    post_grad = _read(os.path.join(trace_dir, POST_GRAD))
    code = _read(os.path.join(trace_dir, OUTPUT_CODE))
    names = _input_names(post_grad, inputs)
    found = {"post_grad_graph": POST_GRAD if post_grad else None, "output_code": OUTPUT_CODE if code else None}
    found.update(post_grad_leftovers(post_grad, names))
    found.update(output_code_calls(code, names))
    return found


def post_grad_leftovers(post_grad: str, names: dict[str, str]) -> dict:
    """KV-cache clones / copy-backs and ``auto_functionalized`` nodes in a post-grad graph's code."""
    kv = lambda arg: names.get(arg, arg).startswith(KV_CACHE_PREFIX)  # noqa: E731
    clones = [names.get(a, a) for a in _CLONE.findall(post_grad) if kv(a)]
    copy_backs = [names.get(dst, dst) for dst, src in _COPY.findall(post_grad) if kv(dst) and src != dst]
    return {"kv_cache_clones": clones, "kv_cache_copy_backs": copy_backs,
            "auto_functionalized": len(_AUTO_FUNCTIONALIZED.findall(post_grad))}


def output_code_calls(code: str, names: dict[str, str]) -> dict:
    """Calls in the output code's ``call`` function, by kind, and its generated kernels."""
    body = code[code.find("def call("):] if "def call(" in code else ""
    body = body[:body.find("\ndef ")] if "\ndef " in body else body  # up to get_args / benchmark helpers
    ops = Counter()
    for ns, op, _, aten_op, _ in _OP_CALL.findall(body):
        ops[f"{ns}.{op}" if ns else f"aten.{aten_op}"] += 1
    kv_args = [a for a, n in names.items() if n.startswith(KV_CACHE_PREFIX)]
    kv_copies = sum(1 for line in body.splitlines()
                    if ("clone" in line or "copy_" in line) and any(re.search(rf"\b{a}\b", line) for a in kv_args))
    return {"extern_kernels": dict(Counter(_EXTERN.findall(body))),
            "aten_fallbacks": {k: v for k, v in ops.items() if k.startswith("aten.")},
            "custom_op_calls": {k: v for k, v in ops.items() if not k.startswith("aten.")},
            "generated_kernels": dict(Counter(_KERNEL_DEF.findall(code))),
            "kv_cache_copies_in_output_code": kv_copies}


def _input_names(post_grad: str, inputs: list[str]) -> dict[str, str]:
    """Inductor's input names (``arg0_1``...) -> the placeholder names of the graph we handed it."""
    match = _SIGNATURE.search(post_grad)
    if not match:
        return {}
    args = _ARG.findall(re.sub(r'"[^"]*"', "", match.group(1)))
    return dict(zip(args, inputs)) if len(args) == len(inputs) else {}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
