# examples/engine.py: the offline engine on two prompts (random weights: the tokens carry no meaning)
import torch
from fullgraph_backend.engine import LLM, SamplingParams

if torch.cuda.is_available():  # Qwen2.5-1.5B shapes; or a local HF directory (config.json + *.safetensors)
    sizes = dict(model="qwen2.5-1.5b", max_num_seqs=256, max_num_batched_tokens=512, max_model_len=4096)
else:  # the tiny model; a small token budget keeps the capture sizes (and the startup on CPU) few
    sizes = dict(model="tiny", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256)
llm = LLM(**sizes, optimization_level=4, dtype="auto", seed=0)
print(llm.startup)                       # compile s, capture s, graphs, graph memory, KV blocks, compile cache
prompt_token_ids = [[1, 2, 3, 4, 5], [6, 7, 8]]  # token ids; text prompts need a model directory with a tokenizer
outs = llm.generate(prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
for out in outs:
    print(f"prompt {out.prompt_token_ids}: {len(out.token_ids)} tokens {out.token_ids[:8]}..., "
          f"{out.finish_reason}, first token after {out.ttft * 1e3:.0f} ms")
