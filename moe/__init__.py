"""MoE decoder language models and the single training/evaluation job of a sweep.

Importing this package does no work; see `moe.config`, `moe.model`, `moe.train`.
"""

__version__ = "0.1.0"


def load_model(run_dir, device="cpu"):
    """The trained model of a run directory (newest valid checkpoint), in eval mode.

    `load_model(RUN_DIR)(idx_BT).logits_BTV` are its logits. Torch is imported on the
    first call, so `import moe` stays light.
    """
    from moe.checkpoint import load_run_model

    return load_run_model(run_dir, device=device)[0]
