"""Leaving the toolkit: Hugging Face export (`moe export`) and lm-evaluation-harness runs.

`export_hf(RUN_DIR, OUT)` writes a transformers checkpoint (Mixtral for MoE runs,
Llama for dense ones) that `AutoModelForCausalLM.from_pretrained(OUT)` loads
without `trust_remote_code`, so vLLM and lm-eval load it too.
"""

from moe.export.hf import ExportError, export_hf, hf_config, hf_state_dict

__all__ = ["ExportError", "export_hf", "hf_config", "hf_state_dict"]
