# examples/api_tour.py: one mixed step (a prompt and a decode) of a random-weight decoder, compiled and eager
import torch
import fullgraph_backend as fg
from fullgraph_backend.models import build_model, get_config

# on CPU the graphs are emulated (a replay re-runs the compiled code): it shows the API, not the speed
device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
config = get_config("tiny")                       # or "qwen2.5-1.5b", "llama-3.2-1b"
model = build_model(config, seed=0, dtype=dtype, device=device)  # random weights; calls fg.attention(q, k, v, layer)
# the KV cache and the static metadata buffers, allocated once at their maximum size
ctx = config.forward_context(dtype=dtype, device=device, max_num_seqs=8, max_num_tokens=64, max_model_len=256)
compiled = torch.compile(model, backend="fullgraph", options={"cudagraph_mode": "full"})

with fg.use_forward_context(ctx), torch.inference_mode():
    # two requests: a 5-token prompt and one decode token after 9 cached tokens
    positions = ctx.prepare(query_lens=[5, 1], seq_lens=[5, 10], block_tables=[[1], [2]])
    ids = torch.randint(0, config.vocab_size, (6,), device=device)
    torch._dynamo.mark_dynamic(ids, 0); torch._dynamo.mark_dynamic(positions, 0)
    logits = compiled(ids, positions)             # valid until the next call: it lives in the graph pool
    expected = model(ids, positions)              # eager, same KV cache and metadata
print(f"logits {tuple(logits.shape)} {dtype} on {device}, max |compiled - eager| {(logits - expected).abs().max():.1e}")
print("next token of each request:", logits[[4, 5]].argmax(-1).tolist())
