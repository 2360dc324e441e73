"""`moe ensemble`: the logit average of K trained runs, next to each member, on the first
member's validation batches and tasks.

The ensemble's next-token distribution is softmax(mean_k z_k), z_k the members'
logits: a normalised geometric mean of their distributions. Cross-entropy is convex in
the logits (CE(z) = logsumexp(z) - z_y), so by Jensen's inequality, for every token,

    CE(mean_k z_k) = mean_k CE(z_k) - [mean_k logsumexp(z_k) - logsumexp(mean_k z_k)]

with the bracket >= 0: the logit average's loss is never above the members' mean loss,
just as for the arithmetic mean of probabilities (convexity of -log). Neither average is
guaranteed to beat the best member, and neither is always below the other.
tests/test_recipes.py checks the identity and these statements on two different models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe.checkpoint import load_run_model
from moe.data.shards import load_data
from moe.errors import BadInput
from moe.io import check_output_dir, claim_output_dir
from moe.model import IGNORE_INDEX, ModelOutput
from moe.record import build_result
from moe.rundir import RunDir
from moe.train.step import validation_loss


class LogitAverage(torch.nn.Module):
    """Models whose logits are averaged: forward(idx, targets) like `MoELM`."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        super().__init__()
        if not models:
            raise BadInput("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(models)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None
                ) -> ModelOutput:
        logits_BTV = torch.stack([m(idx_BT).logits_BTV.float() for m in self.members]).mean(0)
        ce = None
        if targets_BT is not None:
            B, T, V = logits_BTV.shape
            ce = F.cross_entropy(logits_BTV.view(B * T, V), targets_BT.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
        zero = logits_BTV.new_zeros(())
        return ModelOutput(logits_BTV=logits_BTV, ce_loss=ce, lb_loss=zero, z_loss=zero,
                           routing=())


def _members(run_dirs: list[str | os.PathLike], device) -> tuple[list, list, list[str]]:
    models, configs, ids = [], [], []
    for run_dir in run_dirs:
        model, cfg, _ = load_run_model(run_dir, device=device)
        models.append(model)
        configs.append(cfg)
        ids.append((RunDir(run_dir).read_result() or {}).get("run_id", Path(run_dir).name))
    first = configs[0]
    for cfg, rid in zip(configs[1:], ids[1:], strict=True):
        if (cfg.model.vocab_size, cfg.data.source) != (first.model.vocab_size, first.data.source):
            raise BadInput(f"run {rid} has another vocabulary or data source than {ids[0]}; "
                             "an ensemble needs members trained on the same tokens")
    return models, configs, ids


def ensemble_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike, *,
                  device: str | torch.device = "cpu", force: bool = False) -> dict[str, Any]:
    """Evaluate the logit average of `run_dirs` and each member; write `out`/result.json."""
    target = RunDir(out)
    device = torch.device(device)
    if target.is_done():
        raise BadInput(f"{target.path} already holds a result; choose a new --out directory")
    source = ",".join(str(Path(d).resolve()) for d in run_dirs)
    check_output_dir(target.path, "ensemble", source=source, force=force)
    models, configs, ids = _members(run_dirs, device)
    cfg = configs[0]
    data = load_data(cfg.data, cfg.model.seq_len)
    member_loss = [validation_loss(m, data, cfg, device) for m in models]
    ensemble = LogitAverage(models).eval()
    record = build_result(cfg, val_loss=validation_loss(ensemble, data, cfg, device),
                          recipe="ensemble")
    record.update({"run_id": target.path.name, "ensemble.k": len(models),
                   "ensemble.members": ",".join(ids),
                   "val_loss_members_mean": sum(member_loss) / len(member_loss),
                   "val_loss_members_best": min(member_loss)})
    record.update({f"member/{i}/val_loss": v for i, v in enumerate(member_loss)})
    if cfg.eval.tasks:
        record.update(_task_columns(ensemble, models, data, cfg, device))
    claim_output_dir(target.path, "ensemble", source=source, force=force)
    target.write_config(cfg)
    target.write_result(record)
    return record


def _task_columns(ensemble, models, data, cfg, device) -> dict[str, Any]:
    """The ensemble's task/<name>/<metric> columns and each member's task loss."""
    from moe.eval import evaluate_tasks, flat_results

    names = list(cfg.eval.tasks)
    columns = flat_results(evaluate_tasks(ensemble, data.tokenizer, cfg, names, device=device))
    for i, model in enumerate(models):
        for name, res in evaluate_tasks(model, data.tokenizer, cfg, names, device=device).items():
            columns[f"member/{i}/{name}/loss"] = res["loss"]
    return columns
