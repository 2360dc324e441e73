"""Export a run to the Hugging Face transformers format.

- MoE, `norm_topk_prob = true`: **MixtralForCausalLM**; weights
  `block_sparse_moe.gate` and `block_sparse_moe.experts.<e>.w1/w2/w3`;
- MoE, `norm_topk_prob = false`: **Qwen2MoeForCausalLM**; weights `mlp.gate`,
  `mlp.experts.<e>.gate_proj/up_proj/down_proj` and an inert shared expert;
- dense (`n_experts = 1`): **LlamaForCausalLM**; `mlp.gate_proj/up_proj/down_proj`.

All match this model exactly: pre-norm RMSNorm blocks, RoPE rotating the two
halves of each head (`rotate_half`), grouped-query attention without biases,
SwiGLU FFNs, softmax over all experts then top-k. Mixtral always renormalises the
top-k weights, so a run that does not (`model.norm_topk_prob = false`, OLMoE's
choice) exports as Qwen2-MoE with `norm_topk_prob: false`, `qkv_bias: false` and
its always-present shared expert made inert: width 1 and all-zero weights, so it
adds exactly 0. (OLMoE and Qwen3-MoE, which also leave the weights unnormalised,
apply a norm to queries and keys that this model does not have.) The layouts are
the Hub's, which vLLM and every transformers version read (transformers 5 fuses
the experts on load).

Tokenizer: a run on shards written with a `tokenizers` JSON file exports that
file as `tokenizer.json`; a byte-level run (the pocket corpus) exports an exact
`tokenizers` equivalent of the built-in byte tokenizer (ids 0-255 are the
bytes, `<|endoftext|>` = 256, `<pad>` = 257), so `AutoTokenizer` works on every
export. `export.json` records the run and the checkpoint step exported.

The output directory must be new, empty, or an earlier export of the same run (refreshed
in place, as `moe eval --harness` does with RUN_DIR/export-hf); another model's export or
unrelated files are refused unless `force` (`moe.io.check_output_dir`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.data.tokenizer import ByteTokenizer, Tokenizer
from moe.errors import BadInput
from moe.io import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    new_file_mode,
)
from moe.model.lm import split_qkv


class ExportError(BadInput):
    """The export cannot be written as asked; the message says why."""


def target_architecture(cfg: ModelConfig) -> str:
    """llama | mixtral | qwen2_moe (see the module docstring)."""
    if cfg.is_dense:
        return "llama"
    return "mixtral" if cfg.norm_topk_prob else "qwen2_moe"


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict[str, Any]:
    """config.json of the exported model."""
    arch = target_architecture(cfg)
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers < 5 and vLLM
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "bos_token_id": None,
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    moe = {"num_experts_per_tok": cfg.top_k, "output_router_logits": False}
    if arch == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                **moe, "num_local_experts": cfg.n_experts, "sliding_window": None,
                "router_jitter_noise": 0.0}
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
            **moe, "num_experts": cfg.n_experts, "moe_intermediate_size": cfg.d_hidden,
            "norm_topk_prob": False, "qkv_bias": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.n_layers, "shared_expert_intermediate_size": 1}


def expert_weights(state: dict[str, torch.Tensor], prefix: str):
    """(gate w1_EDH, up w3_EDH, down w2_EHD) of one layer's experts, from either layout:
    separate `w1_EDH`/`w3_EDH`, or one fused gate|up `w13*` [E, D, 2H]."""
    fused = [k for k in state if k.startswith(prefix + "w13")]
    if fused:
        w1_EDH, w3_EDH = state[fused[0]].chunk(2, dim=-1)
    else:
        w1_EDH, w3_EDH = state[prefix + "w1_EDH"], state[prefix + "w3_EDH"]
    (w2,) = [state[k] for k in state if k.startswith(prefix + "w2")]
    return w1_EDH, w3_EDH, w2


def _ffn_weights(state: dict[str, torch.Tensor], ours: str, theirs: str,
                 cfg: ModelConfig) -> dict[str, torch.Tensor]:
    w1_EDH, w3_EDH, w2_EHD = expert_weights(state, ours + "experts.")
    arch = target_architecture(cfg)
    if arch == "llama":  # nn.Linear stores [out, in]
        return {theirs + "mlp.gate_proj.weight": w1_EDH[0].T,
                theirs + "mlp.up_proj.weight": w3_EDH[0].T,
                theirs + "mlp.down_proj.weight": w2_EHD[0].T}
    moe = theirs + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = {moe + "gate.weight": state[ours + "router.weight_ED"]}
    for e in range(cfg.n_experts):
        for name, w in zip(names, (w1_EDH[e].T, w3_EDH[e].T, w2_EHD[e].T), strict=True):
            out[f"{moe}experts.{e}.{name}.weight"] = w
    if arch == "qwen2_moe":  # the inert shared expert: width 1, zero weights, adds 0
        D = cfg.d_model  # four tensors (safetensors refuses shared storage)
        out.update({moe + "shared_expert.gate_proj.weight": w1_EDH.new_zeros(1, D),
                    moe + "shared_expert.up_proj.weight": w1_EDH.new_zeros(1, D),
                    moe + "shared_expert.down_proj.weight": w1_EDH.new_zeros(D, 1),
                    moe + "shared_expert_gate.weight": w1_EDH.new_zeros(1, D)})
    return out


def attention_weights(state: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wq, Wk, Wv) of one layer from either layout: one fused `wqkv`, or separate (older
    checkpoints) `wq`/`wk`/`wv`."""
    if prefix + "wqkv.weight" in state:
        return split_qkv(state[prefix + "wqkv.weight"], cfg.n_heads, cfg.kv_heads)
    return tuple(state[f"{prefix}{w}.weight"] for w in ("wq", "wk", "wv"))


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The toolkit's `MoELM.state_dict()` renamed and transposed to transformers' names."""
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        q, k, v = attention_weights(state, ours + "attn.", cfg)
        for w, hf_name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"),
                           (state[f"{ours}attn.wo.weight"], "o_proj")):
            out[f"{theirs}self_attn.{hf_name}.weight"] = w
        out.update(_ffn_weights(state, ours + "ffn.", theirs, cfg))
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def byte_tokenizer_json() -> str:
    """A `tokenizers` JSON equal to `ByteTokenizer`: byte b -> id b, EOS 256, PAD 257."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True),
                            AddedToken("<pad>", special=True)])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenisation emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, map(chr, printable), strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def _tokenizer_files(tok: Tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ special tokens) for AutoTokenizer."""
    if isinstance(tok, ByteTokenizer):
        text, eos, pad = byte_tokenizer_json(), "<|endoftext|>", "<pad>"
    else:
        from tokenizers import Tokenizer as HFTok

        text = Path(tok.path).read_text(encoding="utf-8")  # the run's tokenizer file, as is
        inner = HFTok.from_str(text)
        eos, pad = inner.id_to_token(tok.eos_id), inner.id_to_token(tok.pad_id)
    atomic_write_text(out / "tokenizer.json", text)
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad,
        "bos_token": None, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False})
    atomic_write_json(out / "special_tokens_map.json", {"eos_token": eos, "pad_token": pad})


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """model.safetensors written to a temporary name and renamed (never half a file)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, new_file_mode())  # mkstemp made it 0600; the umask decides
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              dtype: str = "float32", force: bool = False) -> Path:
    """Write RUN_DIR's newest checkpoint as a transformers model directory; returns it.

    OutputDirNotEmpty (exit 2) when `out_dir` holds anything but an export of this run,
    unless `force`.
    """
    from moe.checkpoint import load_run_model
    from moe.data.tokenizer import tokenizer_for_data

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ExportError(f"--dtype {dtype!r} must be float32 or bfloat16")
    source = str(Path(run_dir).resolve())
    force = force or _exported_run(out_dir) == source  # an earlier export of this run
    check_output_dir(out_dir, "export", source=source, force=force)
    model, cfg, step = load_run_model(run_dir)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ExportError("export needs safetensors: pip install safetensors") from None
    tok = tokenizer_for_data(cfg.data.source)
    out = claim_output_dir(out_dir, "export", source=source, force=force)
    _save_safetensors(hf_state_dict(model.state_dict(), cfg.model, torch_dtype),
                      out / "model.safetensors")
    atomic_write_json(out / "config.json", hf_config(cfg.model, tok, dtype))
    atomic_write_json(out / "generation_config.json", {
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": None})
    _tokenizer_files(tok, out)
    atomic_write_json(out / "export.json", {"run_dir": str(Path(run_dir).resolve()),
                                            "step": step, "format": "hf", "dtype": dtype})
    return out


def _exported_run(out_dir: str | os.PathLike) -> str | None:
    """The run directory an export directory was written from (None if not an export)."""
    try:
        record = json.loads((Path(out_dir) / "export.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("run_dir") if isinstance(record, dict) else None


def exported_step(out_dir: str | os.PathLike) -> int | None:
    """The checkpoint step an export directory holds (None when it is not an export)."""
    path = Path(out_dir) / "export.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("step")
