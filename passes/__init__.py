"""FX graph passes run on the Dynamo graph before Inductor, each a small module with one job."""
from passes.manager import PassManager, PassResult
from passes.swap_attention import AttentionSwap, SwapReport, swap_attention
from passes.swap_linear import LinearSwapReport, swap_linear
from passes.fuse_norm_linear import NormFusionReport, fuse_norm_linear
from passes.fuse_silu_linear import SiluFusionReport, fuse_silu_linear
from passes.fuse_silu_epilogue import SiluEpilogueReport, fuse_silu_epilogue
from passes.merge_linears import LinearMergeReport, merge_linears
from passes.split_attention import split_at_attention
from passes.batch_mixing import find_batch_mixing
from passes.host_inputs import HostInputReport, move_host_inputs
from passes.group_query_heads import QueryGroupReport, group_query_heads

__all__ = ["PassManager", "PassResult", "AttentionSwap", "SwapReport", "swap_attention", "LinearSwapReport",
           "swap_linear", "NormFusionReport", "fuse_norm_linear", "SiluFusionReport",
           "fuse_silu_linear", "SiluEpilogueReport", "fuse_silu_epilogue",
           "LinearMergeReport", "merge_linears", "split_at_attention", "find_batch_mixing", "HostInputReport",
           "move_host_inputs", "QueryGroupReport", "group_query_heads"]
