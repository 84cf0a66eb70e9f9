"""The backend's one configuration object, built from ``torch.compile(..., options={...})``."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields

CUDAGRAPH_MODES = ("full", "full_and_piecewise", "piecewise", "none")
COMPILERS = ("inductor", "eager")


def default_capture_sizes() -> tuple[int, ...]:
    """1, 2, 4, then 8..256 in steps of 8, then 272..512 in steps of 16 (vLLM's ladder)."""
    return (1, 2, 4, *range(8, 257, 8), *range(272, 513, 16))


@dataclass(frozen=True)
class FullgraphConfig:
    """Options of ``backend="fullgraph"``; every field is an accepted ``options`` key.

    - ``capture_sizes``: padded batch sizes (tokens) to capture; larger batches run the compiled
      graph without CUDA graphs.
    - ``cudagraph_mode``: ``full`` (one graph per size), ``piecewise`` (graphs between attention
      calls, attention eager: the baseline), ``full_and_piecewise`` (full graphs for uniform-decode
      batches, pieces for mixed ones), ``none`` (compiled code, no graphs).
    - ``attention_impl``: ``auto`` or an implementation name (see ``impl_names()``).
    - ``max_num_seqs``: most requests per step; uniform-decode graphs are captured up to the
      first capture size that holds it. Defaults to the forward context's.
    - ``compiler``: ``inductor``, or ``eager`` to run the transformed FX graph as is (debugging,
      fast CPU tests).
    - ``dump_dir``: folder for graph dumps, one subfolder per compiled graph (see
      :mod:`fullgraph_backend.dump`). Defaults to the ``FULLGRAPH_DUMP_DIR`` environment variable,
      read here and nowhere else.
    - ``inductor_config``: extra ``torch._inductor.config`` patches for this compile, e.g.
      ``{"coordinate_descent_tuning": True}``; ``triton.cudagraphs`` stays off (we capture).
    - ``gemv``: in graphs captured on CUDA, run one-row 16-bit linears on our Triton GEMV instead
      of cuBLAS (:mod:`fullgraph_backend.gemv`, the ``swap_linear`` pass; past K = 4096, the down
      projection, only where ``pdl`` launches it), and linears of 2 to 16 rows on our tensor-core
      few-row kernel (:mod:`fullgraph_backend.few_rows`: a batch-16 decode step 3% shorter on the
      H200, perf-notes section 41); False keeps cuBLAS.
    - ``fuse_norm``: with ``gemv``, fold each RMSNorm (and the residual add before it) that feeds only
      a linear into that linear's op, so at batch 1 the GEMV computes the norm in its prologue and
      Inductor's norm kernel goes (the ``fuse_norm_linear`` pass; perf-notes sections 32, 34, 35).
      Off by default: on the H200 it gains 1-3% at batch 1 alone, but with ``pdl`` (the default)
      it costs 2.6% there (1.39 -> 1.43 ms), and nothing at 16 and 64. float32 graphs are left alone.
    - ``fuse_silu``: with ``gemv``, fold each SiLU-mul (``silu(gate) * up``) that feeds only a linear
      (the down projection) into that linear's op, so at batch 1 the GEMV computes it in its
      prologue and down leaves cuBLAS's split-K (the ``fuse_silu_linear`` pass; perf-notes section
      36). float32 graphs are left alone.
    - ``fuse_silu_epilogue``: with ``gemv``, fold each SiLU-mul whose two halves come from one linear
      (the gated MLP's merged gate_up projection) into that linear's op, so at batch 1 the GEMV
      computes it in its epilogue and Inductor's SiLU-mul kernel goes (the ``fuse_silu_epilogue``
      pass; perf-notes section 49). It takes the SiLU-mul ``fuse_silu`` would fold into down, so
      ``fuse_silu`` needs it off. float32 graphs are left alone.
    - ``pdl``: in graphs captured on CUDA devices of compute capability 9.0+, launch our Triton
      kernels (the GEMV, split-KV decode) and Inductor's with programmatic dependent launch, so a
      kernel starts (and the GEMV loads weights) while the one before it drains
      (:mod:`fullgraph_backend.pdl`; perf-notes sections 18, 35: 1.57 -> 1.39 ms at batch 1 on the
      H200, unchanged at 16 and 64). There Inductor also compiles with combo kernels (independent
      small kernels launched as one: -2.4 to -2.8% at batch 1, section 36); ``inductor_config`` overrides
      either. A graph in which none of our kernels can run (no swapped attention, no 16-bit linear
      of 1 to 16 rows: transformers' static-cache step at batch 32) goes without (section 39). Elsewhere it
      changes nothing.
    - ``group_query_heads``: where a one-query-position SDPA reads keys and values that the model
      copied once per query head (transformers' ``repeat_kv``, when it passes a mask), let it read
      the shared heads instead, the copy gone (the ``group_query_heads`` pass): on the H200 a batch-8
      step of Llama-3.2-1B's shapes 0.18 ms faster. Only where the batch is known and batch x key/value
      heads >= 64: at batch 1 the grouped call ran 0.18 ms a step slower (perf-notes section 40).
    - ``regional_compile``: compile each distinct repeated region of a graph (a decoder layer) with
      Inductor once and call its code for every copy, instead of compiling the whole graph
      (:mod:`fullgraph_backend.regions`; perf-notes section 27). Every layer runs the kernels it
      ran compiled whole (the prologue may write RoPE's cos / sin once more); a graph without 3
      alike regions, or compiled with ``max_autotune``, is compiled whole (logged). False always
      compiles whole.
    """

    capture_sizes: tuple[int, ...] = field(default_factory=default_capture_sizes)
    cudagraph_mode: str = "full"
    attention_impl: str = "auto"
    max_num_seqs: int | None = None
    compiler: str = "inductor"
    dump_dir: str | None = field(default_factory=lambda: os.environ.get("FULLGRAPH_DUMP_DIR") or None)
    inductor_config: dict = field(default_factory=dict)
    gemv: bool = True
    fuse_norm: bool = False
    fuse_silu: bool = False
    fuse_silu_epilogue: bool = True
    pdl: bool = True
    group_query_heads: bool = True
    regional_compile: bool = True

    def __post_init__(self) -> None:
        from fullgraph_backend.attention.registry import impl_names

        sizes = self.capture_sizes
        if isinstance(sizes, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"capture_sizes must be a sequence of positive ints, got {sizes!r}")
        object.__setattr__(self, "capture_sizes", tuple(sorted(set(sizes))))
        _check_choice("cudagraph_mode", self.cudagraph_mode, CUDAGRAPH_MODES)
        _check_choice("compiler", self.compiler, COMPILERS)
        _check_choice("attention_impl", self.attention_impl, tuple(impl_names()))
        self._check_inductor_config()
        for name in ("gemv", "fuse_norm", "fuse_silu", "fuse_silu_epilogue", "pdl", "group_query_heads",
                     "regional_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fuse_silu and self.fuse_silu_epilogue:
            raise ValueError("fuse_silu folds the SiLU-mul that fuse_silu_epilogue (on by default) folds into "
                             "gate_up's epilogue: pass fuse_silu_epilogue=False with it")
        if self.max_num_seqs is not None and (not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1):
            raise ValueError(f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")

    def _check_inductor_config(self) -> None:
        import torch._inductor.config as inductor_config

        if not isinstance(self.inductor_config, dict):
            raise ValueError(f"inductor_config must be a dict of torch._inductor.config names, got {self.inductor_config!r}")
        for key in self.inductor_config:
            if key == "triton.cudagraphs" or key not in inductor_config._config:
                raise ValueError(f"inductor_config: {key!r} is not a torch._inductor.config option this backend accepts")

    @classmethod
    def from_options(cls, options: dict | None) -> "FullgraphConfig":
        """Build from ``torch.compile`` options; an unknown key is an error naming the close ones."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        for key in options:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(f"unknown fullgraph option {key!r}{did_you_mean}; known options: {sorted(known)}")
        return cls(**options)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
