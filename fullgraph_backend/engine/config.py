"""The engine's one configuration object: every ``LLM(...)`` keyword, validated on construction."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

import torch

from fullgraph_backend.attention.registry import impl_names
from fullgraph_backend.distributed.processes import torchrun_rank
from fullgraph_backend.engine.levels import backend_options

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_IMPLS = ("auto", "fullgraph", "transformers")


@dataclass(frozen=True)
class EngineConfig:
    """Options of :class:`~fullgraph_backend.engine.LLM` (vLLM's names where vLLM has one).

    - ``model``: a named reference config (``tiny``, ``qwen2.5-1.5b``, ``llama-3.2-1b``; random
      weights from ``seed``) or a local Hugging Face-format directory.
    - ``model_impl``: ``fullgraph`` (our own Llama / Qwen2 decoder), ``transformers`` (the family's
      transformers modeling code, attention through ours: :mod:`fullgraph_backend.models.hf`), or
      ``auto``: ours where it can run the model, transformers' otherwise (logged).
    - ``optimization_level``: 0..4, see :mod:`fullgraph_backend.engine.levels`; ``cudagraph_mode``
      overrides its graph mode, ``compile_options`` any backend option (``capture_sizes``,
      ``compiler``, ``inductor_config``, ``dump_dir``, ...).
    - ``max_num_seqs``: requests per step; ``max_num_batched_tokens``: the per-step token budget
      (prefill chunks and decodes together); ``max_model_len``: prompt plus output, default
      ``min(2048, max_position_embeddings)``.
    - ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
    - ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
    - KV cache: ``block_size`` tokens a block; ``num_kv_blocks`` fixes the block count, else it is
      sized from ``gpu_memory_utilization`` (see :mod:`fullgraph_backend.engine.kv_budget`).
    - ``async_scheduling``: schedule and launch the next step while the device runs the current
      one (vLLM's ``async_scheduling``), so host time hides behind device time; a request that
      stops on a stop token costs one spare step. False: one step at a time.
    - ``tensor_parallel_size``: processes (one device each: a GPU, or the CPU with gloo) the model
      is split over, our own decoder only (:mod:`fullgraph_backend.engine.parallel`).
      ``all_reduce``: ``auto`` (on GPUs, small all-reduces one shot over symmetric memory where
      every rank can set it up, NCCL for the rest: :mod:`fullgraph_backend.distributed.symmetric`)
      or ``nccl`` (NCCL for all).
    """

    model: str
    optimization_level: int = 4
    cudagraph_mode: str | None = None
    compile_options: dict | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    attention_impl: str = "auto"
    async_scheduling: bool = True
    model_impl: str = "auto"
    tensor_parallel_size: int = 1
    all_reduce: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a config name or a directory, got {self.model!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0, high=2**64 - 1)  # what torch.Generator.manual_seed takes
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {self.async_scheduling!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {list(MODEL_IMPLS)}, got {self.model_impl!r}")
        if self.attention_impl not in impl_names():
            raise ValueError(f"attention_impl must be one of {impl_names()}, got {self.attention_impl!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        if not (self.dtype == "auto" or self.dtype in DTYPES or self.dtype in DTYPES.values()):
            raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}")
        self._check_tensor_parallel()
        if _is_int(self.optimization_level):
            backend_options(self.optimization_level, self.cudagraph_mode, self.compile_options)  # raises if bad
        else:
            raise ValueError(f"optimization_level must be an int 0..4, got {self.optimization_level!r}")

    def _check_tensor_parallel(self) -> None:
        size = self.tensor_parallel_size
        _check_int("tensor_parallel_size", size, low=1)
        if self.all_reduce not in ("auto", "nccl"):
            raise ValueError(f"all_reduce must be 'auto' or 'nccl', got {self.all_reduce!r}")
        if size > 1 and self.model_impl == "transformers":
            raise ValueError(f"tensor_parallel_size={size} splits fullgraph's own decoder only; model_impl="
                             f"'transformers' has no tensor-parallel split yet: use model_impl='fullgraph' (Llama, "
                             f"Qwen2) or tensor_parallel_size=1")
        if size > 1 and self.torch_device.type == "cuda" and torchrun_rank() is None:
            count = torch.cuda.device_count()
            if size > count:
                raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs (one process each), and {count} "
                                 f"{'is' if count == 1 else 'are'} visible: lower it, or check CUDA_VISIBLE_DEVICES")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Build from ``LLM(model, **kwargs)``; an unknown keyword is an error naming the close one."""
        known = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"unknown LLM option {key!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                 f"known options: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                            else "cpu" if self.device == "auto" else self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES.get(self.dtype, self.dtype)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
