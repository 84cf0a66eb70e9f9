"""The offline engine on the fullgraph backend: ``LLM(...).generate(prompts, SamplingParams(...))``.

Modules, one job each: ``config`` (options), ``levels`` (-O0..-O4), ``params`` (sampling),
``sequence`` (request state and outputs), ``block_manager`` (KV blocks), ``scheduler``
(continuous batching, chunked prefill), ``kv_budget`` (cache size), ``loader`` (models),
``model_runner`` (metadata, model, sampling per step), ``compile_cache`` (what Inductor's caches
did at startup), ``sampler``, ``llm`` (the front),
``parallel`` (the engine over several processes: ``tensor_parallel_size``), ``bench`` (latency and
serving benchmarks).
"""
from fullgraph_backend.engine.config import EngineConfig
from fullgraph_backend.engine.levels import OPTIMIZATION_LEVELS
from fullgraph_backend.engine.llm import LLM
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.sequence import RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig", "OPTIMIZATION_LEVELS"]
