"""Parity with the PyTorch baseline: the same weights and batch through HF transformers (torch) and dpo_jax.

    python -m dpo_jax.interop.compare_torch --model DIR --data pairs.jsonl [--reference DIR] [--beta 0.1]
    python -m dpo_jax.interop.compare_torch --model BASE_DIR --adapter PEFT_DIR --data pairs.jsonl  # LoRA vs PEFT

The torch side is a plain PyTorch DPO step as TRL computes it (one concatenated forward over chosen and
rejected, the reference under `no_grad`, sigmoid loss of seed eq. (7), global-norm clipping,
`torch.optim.AdamW` with no decay on biases/norms). The report gives max |a - b| and max |a - b| / max |b|
for logits, sequence log-probs, the loss, gradients per parameter group, and params after one update.
Needs torch (the `test` extra). fp32 on CPU.

Mixture-of-experts models (Mixtral, Qwen3-MoE): the torch loss adds `router_aux_loss_coef * outputs.aux_loss` of the
policy's forward (`output_router_logits=True`, padding masked), as TRL's DPOTrainer does, and dpo_jax adds its
load-balancing loss with the same coefficient (`config.loss.router_aux_coef` unset); the report adds `router_aux`,
the two load-balancing losses, and the groups `router` and `experts`. transformers 5 keeps the experts fused in
memory; torch's gradients and params are compared under the per-expert names `save_pretrained` writes
(`layouts.per_expert_state_dict`). Router jitter is switched off on the torch side (dpo_jax routes without noise).
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import logprobs, model as model_lib, optim, step
from dpo_jax.interop import hf
from dpo_jax.interop.hf import layouts, peft as peft_io

# The first matching pattern names a tensor's group: MoE routers (`mlp.gate.weight`, Mixtral's
# `block_sparse_moe.gate.weight`) and experts come before the dense MLP's `.mlp.`.
GROUPS = (("router", r"\.(mlp|block_sparse_moe)\.gate\.weight$"), ("experts", r"\.experts\."),
          ("embed", r"embed_tokens"), ("attention", r"self_attn\."), ("mlp", r"\.mlp\."), ("norms", r"norm"),
          ("lm_head", r"lm_head"))


def param_group(name: str) -> str:
  for group, pattern in GROUPS:
    if re.search(pattern, name):
      return group
  return "other"


def optimizer_config(lr: float, weight_decay: float, max_grad_norm: float) -> dict:
  return dict(learning_rate=lr, schedule="constant", warmup_steps=0, total_steps=1, end_lr_ratio=1.0, b1=0.9,
              b2=0.999, eps=1e-8, weight_decay=weight_decay, max_grad_norm=max_grad_norm)


def _torch_scoring(batch: Mapping[str, np.ndarray]):
  """(input ids, attention mask, logits `[N, T, V]` -> sequence log-probs `[N]`) of a DPO batch, in torch."""
  import torch
  ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
  attention = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch["loss_mask"])[:, 1:], dtype=torch.float32)

  def sequence_logps(logits):
    token = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token * mask).sum(-1)
  return ids, attention, sequence_logps


def torch_dpo_step(policy: Any, reference: Any, batch: Mapping[str, np.ndarray], *, beta: float, lr: float,
                   weight_decay: float, max_grad_norm: float, router_aux_coef: float | None = None) -> dict:
  """One plain PyTorch DPO step on `policy` (modified in place). Arrays come back as numpy, HF names (as torch
  names its parameters: transformers 5's fused experts for MoE models).

  `router_aux_coef`: None for a dense model; for an MoE one the loss adds this times the policy forward's
  `aux_loss` (TRL's DPOTrainer with `router_aux_loss_coef`), returned as `router_aux`."""
  import torch
  import torch.nn.functional as F

  ids, attention, sequence_logps = _torch_scoring(batch)

  policy.train()
  moe_kwargs = {} if router_aux_coef is None else {"output_router_logits": True}
  for module in policy.modules():
    if getattr(module, "jitter_noise", 0):  # Mixtral's train-mode router noise: dpo_jax has none
      module.jitter_noise = 0.0
  outputs = policy(input_ids=ids, attention_mask=attention, **moe_kwargs)
  logits = outputs.logits
  logps = sequence_logps(logits)
  with torch.no_grad():
    ref_logps = sequence_logps(reference(input_ids=ids, attention_mask=attention).logits)
  margin = (logps[0::2] - ref_logps[0::2]) - (logps[1::2] - ref_logps[1::2])  # rows interleave pairs
  loss = -F.logsigmoid(beta * margin).mean()
  extra = {}
  if router_aux_coef is not None:
    loss = loss + router_aux_coef * outputs.aux_loss
    extra["router_aux"] = np.float64(outputs.aux_loss.item())
  policy.zero_grad()
  loss.backward()
  grads = {n: p.grad.detach().numpy().copy() for n, p in policy.named_parameters()}
  params = [p for p in policy.parameters()]
  if max_grad_norm:
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8).step()
  return {"logits": logits.detach().numpy(), "logps": logps.detach().numpy(), "loss": np.float64(loss.item()),
          "grads": grads, "params": {n: p.detach().numpy().copy() for n, p in policy.named_parameters()}, **extra}


def jax_dpo_step(cfg: model_lib.ModelConfig, policy: Any, reference: Any, batch: Mapping[str, np.ndarray], *,
                 beta: float, lr: float, weight_decay: float, max_grad_norm: float, model_type: str) -> dict:
  """The same step with dpo_jax's own functions, jitted as the trainer runs them; grads and new params converted to
  HF names. MoE models: the loss includes `cfg.router_aux_loss_coef` times the load-balancing loss, returned as
  `router_aux`."""
  model = model_lib.make_model(cfg)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss_cfg = {"type": "sigmoid", "beta": beta, "label_smoothing": 0.0}
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["positions"], b["attention_mask"]))(
      policy, batch)
  logps = logprobs.logps_from_logits(logits, batch["input_ids"], batch["loss_mask"]).logps
  total = jnp.float32(batch["input_ids"].shape[0] // 2)
  grad_fn = jax.jit(lambda p, r, b: jax.value_and_grad(step.dpo_loss, has_aux=True)(
      p, step.reference_logps(model, r, b), b, model=model, loss_cfg=loss_cfg, total_weight=total))
  (loss, sums), grads = grad_fn(policy, reference, batch)
  optimizer, schedule = optim.make_optimizer(optimizer_config(lr, weight_decay, max_grad_norm))
  state = step.TrainState(jnp.zeros((), jnp.int32), policy, optimizer.init(policy))
  train_step = jax.jit(lambda s, r, b: step.train_step(s, r, b, model=model, optimizer=optimizer, schedule=schedule,
                                                       loss_cfg=loss_cfg))
  new_state, _ = train_step(state, reference, batch)
  to_hf = lambda tree: hf.hf_state_dict_from_params(jax.device_get(tree), cfg, model_type=model_type)
  extra = {}
  if "router/aux" in sums:  # the load-balancing loss times the pairs (`step._router_terms`)
    extra["router_aux"] = np.float64(sums["router/aux"] / sums["pairs"])
  return {"logits": np.asarray(logits), "logps": np.asarray(logps), "loss": np.float64(loss),
          "grads": to_hf(grads), "params": to_hf(new_state.params), **extra}


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
  return max_abs, max_abs / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)


def _embedding_name(torch_model: Any) -> str:
  embedding = torch_model.get_input_embeddings()
  return next(n for n, p in torch_model.named_parameters() if p is embedding.weight)


def compare(torch_policy: Any, torch_reference: Any, batch: Mapping[str, np.ndarray], *, beta: float = 0.1,
            lr: float = 1e-3, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
            grad_floor: float = 0.0) -> dict[str, tuple[float, float]]:
  """{quantity: (max abs diff, max relative diff)}; torch is the reference value. `torch_policy` is updated.

  `grad_floor > 0` compares updated params only where torch's |gradient| >= grad_floor: Adam's first step moves
  an element by lr * g / (|g| + eps), which turns fp32 noise in a gradient near eps = 1e-8 into a visible
  fraction of a step; above ~100 eps the update is insensitive to it.

  The row of the embedding's `padding_idx` (if the HF model sets one) is excluded from grads and params: torch
  drops its input-side gradient by construction (see below), so it differs whenever the pad token occurs.
  """
  model_type = torch_policy.config.model_type
  cfg = hf.model_config_from_hf(torch_policy.config)
  policy = hf.params_from_hf_state_dict(torch_policy.state_dict(), cfg, model_type=model_type)
  reference = hf.params_from_hf_state_dict(torch_reference.state_dict(), cfg, model_type=model_type)
  ours = jax_dpo_step(cfg, policy, reference, batch, beta=beta, lr=lr, weight_decay=weight_decay,
                      max_grad_norm=max_grad_norm, model_type=model_type)
  theirs = torch_dpo_step(torch_policy, torch_reference, batch, beta=beta, lr=lr, weight_decay=weight_decay,
                          max_grad_norm=max_grad_norm,
                          router_aux_coef=cfg.router_aux_loss_coef if cfg.num_experts else None)
  for kind in ("grads", "params"):  # MoE: torch's fused expert tensors under the per-expert names we export
    theirs[kind] = layouts.per_expert_state_dict(theirs[kind], cfg, model_type=model_type)
  # HF builds the input embedding as nn.Embedding(padding_idx=config.pad_token_id), which drops the lookup's
  # gradient for that row. When the pad id is a real token (SmolLM2 pads with <|im_end|>), torch's gradient of
  # that row misses every input occurrence; dpo_jax keeps it. That one row is left out of grads/params.
  padding_idx = getattr(torch_policy.get_input_embeddings(), "padding_idx", None)
  embed_name = _embedding_name(torch_policy)
  if padding_idx is not None:
    for kind in ("grads", "params"):
      for side in (ours, theirs):
        if embed_name in side[kind]:
          side[kind][embed_name] = np.delete(side[kind][embed_name], padding_idx, axis=0)
  real = np.asarray(batch["attention_mask"]) > 0
  report = {"logits": _diff(ours["logits"][real], theirs["logits"][real]),
            "logps": _diff(ours["logps"], theirs["logps"]),
            "loss": _diff(ours["loss"], theirs["loss"])}
  if "router_aux" in theirs:
    report["router_aux"] = _diff(ours["router_aux"], theirs["router_aux"])
  for kind in ("grads", "params"):
    by_group: dict[str, tuple[float, float]] = {}
    for name, value in theirs[kind].items():
      if name not in ours[kind]:
        continue  # a tied lm_head is the embedding
      group = f"{kind}/{param_group(name)}"
      mine = ours[kind][name]
      if kind == "params" and grad_floor > 0:
        keep = np.abs(theirs["grads"][name]) >= grad_floor
        mine, value = mine[keep], value[keep]
      a, r = _diff(mine, value)
      old = by_group.get(group, (0.0, 0.0))
      by_group[group] = (max(old[0], a), max(old[1], r))
    report.update(sorted(by_group.items()))
  return report


# ---- LoRA: the same adapters through PEFT + torch and through dpo_jax ----

def torch_lora_dpo_step(peft_model: Any, batch: Mapping[str, np.ndarray], *, beta: float, lr: float,
                        weight_decay: float, max_grad_norm: float) -> dict:
  """One plain PyTorch DPO step on a PEFT LoRA model (updated in place), as TRL runs it with a `peft_config`: the
  policy with adapters, pi_ref the same model under `disable_adapter()`, AdamW over the adapters only. Grads and
  adapters come back under PEFT's saved names (`...q_proj.lora_A.weight`)."""
  import torch
  import torch.nn.functional as F

  ids, attention, sequence_logps = _torch_scoring(batch)

  peft_model.train()
  logits = peft_model(input_ids=ids, attention_mask=attention).logits
  logps = sequence_logps(logits)
  with torch.no_grad(), peft_model.disable_adapter():
    ref_logps = sequence_logps(peft_model(input_ids=ids, attention_mask=attention).logits)
  margin = (logps[0::2] - ref_logps[0::2]) - (logps[1::2] - ref_logps[1::2])
  loss = -F.logsigmoid(beta * margin).mean()
  peft_model.zero_grad()
  loss.backward()
  trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
  saved_name = lambda n: n.replace(".default.", ".")
  grads = {saved_name(n): p.grad.detach().numpy().copy() for n, p in trainable.items()}
  if max_grad_norm:
    torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_grad_norm)
  torch.optim.AdamW(list(trainable.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay).step()
  return {"logits": logits.detach().numpy(), "logps": logps.detach().numpy(), "ref_logps": ref_logps.numpy(),
          "loss": np.float64(loss.item()), "grads": grads,
          "adapters": {saved_name(n): p.detach().numpy().copy() for n, p in trainable.items()}}


def jax_lora_dpo_step(cfg: model_lib.ModelConfig, base: Any, adapters: Any, spec: Any,
                      batch: Mapping[str, np.ndarray], *, beta: float, lr: float, weight_decay: float,
                      max_grad_norm: float) -> dict:
  """The same step with dpo_jax's LoRA: `step.train_step(lora=spec)` over the frozen `base`; grads and adapters
  under PEFT's names."""
  from dpo_jax import lora as lora_lib
  model = model_lib.make_model(cfg)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss_cfg = {"type": "sigmoid", "beta": beta, "label_smoothing": 0.0}
  policy = lora_lib.LoraParams(base, adapters, spec)
  logits = model_lib.apply_params(model, policy, batch["input_ids"], batch["positions"], batch["attention_mask"])
  logps = logprobs.logps_from_logits(logits, batch["input_ids"], batch["loss_mask"]).logps
  total = jnp.float32(batch["input_ids"].shape[0] // 2)
  ref = step.reference_logps(model, base, batch)
  (loss, _), grads = jax.value_and_grad(
      lambda a: step.dpo_loss(step.lora_policy(a, base, spec), ref, batch, model=model, loss_cfg=loss_cfg,
                              total_weight=total), has_aux=True)(adapters)
  optimizer, schedule = optim.make_optimizer(optimizer_config(lr, weight_decay, max_grad_norm))
  state = step.TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters))
  new_state, _ = step.train_step(state, base, batch, model=model, optimizer=optimizer, schedule=schedule,
                                 loss_cfg=loss_cfg, lora=spec)
  to_peft = lambda tree: peft_io.peft_state_dict(jax.device_get(tree), spec, cfg)
  return {"logits": np.asarray(logits), "logps": np.asarray(logps), "ref_logps": np.asarray(ref).reshape(-1),
          "loss": np.float64(loss), "grads": to_peft(grads), "adapters": to_peft(new_state.params)}


def compare_lora(torch_model: Any, adapters: Any, spec: Any, batch: Mapping[str, np.ndarray], *, beta: float = 0.1,
                 lr: float = 1e-3, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0) -> dict[str, tuple[float, float]]:
  """{quantity: (max abs diff, max relative diff)} of one LoRA DPO step: `torch_model` (an HF causal LM, left
  unchanged) wrapped by PEFT with `spec` and our `adapters`, against dpo_jax on the same weights and batch."""
  import copy

  from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

  model_type = torch_model.config.model_type
  cfg = hf.model_config_from_hf(torch_model.config)
  base = hf.params_from_hf_state_dict(torch_model.state_dict(), cfg, model_type=model_type)
  peft_model = get_peft_model(copy.deepcopy(torch_model), LoraConfig(
      r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.targets), bias="none"))
  import torch
  tensors = {k: torch.from_numpy(v.copy()) for k, v in peft_io.peft_state_dict(jax.device_get(adapters), spec,
                                                                              cfg).items()}
  result = set_peft_model_state_dict(peft_model, tensors)
  if result.unexpected_keys:
    raise ValueError(f"PEFT did not take adapter tensors {result.unexpected_keys[:3]}")
  ours = jax_lora_dpo_step(cfg, base, adapters, spec, batch, beta=beta, lr=lr, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm)
  theirs = torch_lora_dpo_step(peft_model, batch, beta=beta, lr=lr, weight_decay=weight_decay,
                               max_grad_norm=max_grad_norm)
  real = np.asarray(batch["attention_mask"]) > 0
  report = {"logits": _diff(ours["logits"][real], theirs["logits"][real]),
            "logps": _diff(ours["logps"], theirs["logps"]),
            "ref_logps": _diff(ours["ref_logps"], theirs["ref_logps"]),
            "loss": _diff(ours["loss"], theirs["loss"])}
  if set(ours["grads"]) != set(theirs["grads"]):
    raise ValueError(f"adapter names differ: ours only {sorted(set(ours['grads']) - set(theirs['grads']))[:3]}, "
                     f"PEFT only {sorted(set(theirs['grads']) - set(ours['grads']))[:3]}")
  for kind in ("grads", "adapters"):
    for side in ("lora_A", "lora_B"):
      names = [n for n in theirs[kind] if f".{side}." in n]
      report[f"{kind}/{side}"] = (max(_diff(ours[kind][n], theirs[kind][n])[0] for n in names),
                                  max(_diff(ours[kind][n], theirs[kind][n])[1] for n in names))
  return report


def format_report(report: Mapping[str, tuple[float, float]]) -> str:
  width = max(len(k) for k in report)
  lines = [f"{'quantity'.ljust(width)}  max|diff|    max|diff|/max|torch|"]
  lines += [f"{k.ljust(width)}  {a:.3e}    {r:.3e}" for k, (a, r) in report.items()]
  return "\n".join(lines)


def main(argv=None) -> None:
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from dpo_jax.data import preference, schemas

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="HF checkpoint folder (the policy)")
  parser.add_argument("--reference", default=None, help="HF checkpoint folder for pi_ref (default: --model)")
  parser.add_argument("--data", required=True, help="JSON/JSONL/Parquet preference rows (any supported schema)")
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--max_prompt_length", type=int, default=64)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lr", type=float, default=1e-5)
  parser.add_argument("--adapter", default=None, help="a PEFT LoRA folder on --model: compare a LoRA DPO step "
                      "(pi_ref = --model with the adapters off) instead of a full one")
  args = parser.parse_args(argv)
  load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager")
  policy, reference = load(args.model), load(args.reference or args.model)
  tokenizer = AutoTokenizer.from_pretrained(args.model)
  tokenized, _ = schemas.tokenize_any(schemas.load_any_rows(args.data), tokenizer, source=args.data,
                                      max_length=args.max_length, max_prompt_length=args.max_prompt_length)
  batch = preference.make_batch(tokenized, np.arange(min(args.pairs, tokenized.num_pairs)), kind="dpo")
  batch.pop("row_ids")
  if args.adapter:
    cfg = hf.model_config_from_hf(policy.config)
    spec, adapters = peft_io.load_peft_adapter(args.adapter, model_lib.make_model(cfg), cfg)
    print(format_report(compare_lora(policy, adapters, spec, batch, beta=args.beta, lr=args.lr)))
    return
  print(format_report(compare(policy, reference, batch, beta=args.beta, lr=args.lr)))
  padding_idx = policy.get_input_embeddings().padding_idx
  if padding_idx is not None:
    print(f"(embedding row {padding_idx}, torch's padding_idx, is left out of grads/params: torch gives it no "
          f"gradient from input occurrences)")


if __name__ == "__main__":
  main()
