"""The decoder LM: attention, top-k router, and experts behind one grouped-matmul seam.

`MoELM(ModelConfig)` is the model; `moe.model.router` and `moe.model.experts` are
its MoE pieces (Router -> Dispatch -> Experts -> Combine).
"""

from moe.model.lm import IGNORE_INDEX, KVCache, ModelOutput, MoELM

__all__ = ["IGNORE_INDEX", "KVCache", "ModelOutput", "MoELM"]
