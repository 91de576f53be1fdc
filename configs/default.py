"""Default config: DPO on the embedded synthetic preference task, sized for a laptop CPU.

Variants: `--config configs/default.py:tiny` (a very small model for tests and smoke runs), `:1b` (a ~1.1B Llama
for a GPU or TPU: bf16 compute on accelerators, fp32 on CPU), `:lora` (DPO trains LoRA adapters, rank 8 on every
projection, instead of all weights), `:moe` (a Mixtral-style mixture of experts: 8 experts, top-2),
`:qwen3-30b-a3b` (Qwen3-30B-A3B's shape: 128 experts, top-8, 30.5B params with 3.3B active, on 64 chips as
expert 8 x fsdp 8; a TPU pod's plan, for `--dry_run`: docs/moe.md). The 1b variant needs a tokenizer with >= 201 tokens
(the embedded task's fits) and is sized for an accelerator: on CPU it runs, slowly.
Override any field from the command line, e.g. `--config.loss.beta=0.05 --config.mesh.fsdp=2`.
"""

import ml_collections

from dpo_jax.sharding import DEFAULT_RULES

# Logical axis name -> mesh axes of the ('data', 'fsdp', 'expert', 'sequence', 'tensor') mesh; the first matching
# rule wins. The table (and why each axis maps where it does) is `dpo_jax.sharding.DEFAULT_RULES`, importable
# without ml_collections.
SHARDING_RULES = DEFAULT_RULES


def _option():
  """A float option that is None (the loss variant's default) until set, e.g. --config.loss.options.rpo_alpha=0.5."""
  return ml_collections.config_dict.placeholder(float)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed: param init, data order, sampling.
  c.stage = "pipeline"  # 'pipeline' (SFT on chosen -> DPO -> evaluate), 'sft' alone, 'dpo' alone (it starts
  #                       from this workdir's SFT result, else hf.model_path), 'precompute' (write pi_ref's
  #                       log-probs as columns into <workdir>/reference_logps/{train,test}.jsonl), 'reward_model'
  #                       (a Bradley-Terry reward model from pi_ref, saved to <workdir>/reward_model), or
  #                       'online_dpo' (the policy samples, config.online.judge labels, DPO trains; from pi_ref).
  c.reference_cache = "auto"  # stages 'pipeline' and 'dpo' with a frozen pi_ref: pi_ref's log-probs of every pair,
  #                             read from <reference_cache_dir>/<key> (the key hashes pi_ref's params, the tokens, the
  #                             data files, the batch layout, the model's numerics) or computed once and stored there;
  #                             DPO then trains with no reference forward (dpo_jax/train/reference_cache.py). 'auto'
  #                             reads an entry, and computes a missing one when the run would score at least as many
  #                             pairs itself; 'on' always computes a missing one; 'off' runs pi_ref in every step.
  c.reference_cache_dir = ""  # the cache folder; '' = $DPO_JAX_REFERENCE_CACHE, else ~/.cache/dpo_jax/reference_logps.
  #                             Multi-host: a folder every host sees (each host writes its rows, every reader reads
  #                             all of them, so a run on another host count reuses an entry).

  c.data = ml_collections.ConfigDict(dict(
      train="",  # '' = the embedded synthetic task; else a local .json/.jsonl/.parquet file, a dataset folder
      #            (save_to_disk or load_dataset layout), or a hub name when online. Schemas: explicit prompt/chosen/
      #            rejected, conversational message lists (chat template), or implicit-prompt HH transcripts.
      test="",  # held-out pairs, same forms; '' = the embedded test set, or data.test_split of data.train.
      train_split="train",  # split read from a dataset folder / hub dataset.
      test_split="test",  # split used for held-out pairs when data.test is empty and data.train is a dataset.
      tokenizer="",  # '' = the embedded task's tokenizer; else a local folder for transformers.AutoTokenizer.
      reference_logps=False,  # stage 'dpo' only: use the data's ref_chosen_logps / ref_rejected_logps columns
      #                         (from stage 'precompute') instead of a reference forward; no reference model is
      #                         held during training (it is reloaded afterwards for the KL evaluation).
      reward="auto",  # ground-truth reward for sample evaluation: 'synthetic' (r* of the embedded task), 'none'
      #                 (skip the reward column; KL is still reported), or 'auto' (synthetic iff data.train='').
      prompt_sharing="auto",  # unpacked DPO batches: 'on' holds each prompt once [B, P] and its responses [2B, R]
      #                         (the prompt runs once for both; same log-probs), 'off' rows prompt + response
      #                         [2B, max_length]; 'auto' = 'on' when that is fewer tokens (P + 2R < 2 max_length).
      packing=False,  # DPO stage: pack several pairs per row (segments masked apart), batch_size / pairs_per_row
      #                 rows per step, each step holding at most batch_size pairs (fewer when long pairs fill it).
      pairs_per_row=4,  # packing: at most this many pairs (2x as many segments) in one packed row.
      pack_length=0,  # packing: tokens per packed row; 0 = 2 * max_length, room for any pair.
      on_bad_row="error",  # a row that cannot be trained on (null/non-string field, bad role, chosen == rejected,
      #                      malformed JSON line, ...): 'error' stops naming file, row and field; 'skip' drops it,
      #                      counted per reason in the data report.
  ))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256,  # embedding rows; must be >= the tokenizer's size (extra rows are never targets).
      hidden_size=128,  # residual stream width D.
      intermediate_size=352,  # SwiGLU hidden width F.
      num_layers=4,  # decoder blocks.
      num_heads=4,  # query heads H.
      num_kv_heads=2,  # key/value heads K (grouped-query attention; H % K == 0).
      head_dim=None,  # None: hidden_size // num_heads.
      rope_theta=10000.0,  # RoPE base.
      rope_scaling_type="none",  # RoPE frequency scaling: 'none', 'linear' (positions / factor) or 'llama3'
      #                            (Llama 3.1/3.2: low frequencies / factor, high kept, smooth band between).
      rope_scaling_factor=1.0,  # context extension factor of 'linear' and 'llama3'; must be 1.0 with 'none'.
      rope_low_freq_factor=1.0,  # 'llama3': wavelengths above rope_original_max_positions / this are divided.
      rope_high_freq_factor=4.0,  # 'llama3': wavelengths below rope_original_max_positions / this are kept.
      rope_original_max_positions=8192,  # 'llama3': the pre-training context length the bands are relative to.
      rms_norm_eps=1e-6,  # RMSNorm epsilon.
      tie_embeddings=True,  # share the input embedding and the LM head.
      qkv_bias=False,  # biases on q/k/v projections (Qwen2).
      attn_out_bias=False,  # bias on the attention output projection.
      mlp_bias=False,  # biases in the MLP.
      initializer_range=0.02,  # stddev of the normal init.
      param_dtype="float32",  # dtype params (and optimizer moments) are stored in.
      compute_dtype="float32",  # dtype of activations and matmuls: 'float32', 'bfloat16', or 'auto' (bfloat16 on
      #                           GPU/TPU, float32 on CPU). Params and optimizer state stay in param_dtype; the
      #                           LM head accumulates in fp32 and log-softmax, log-probs and losses are fp32 always.
      attention_impl="auto",  # attention kernel (dpo_jax/attention.py): 'cudnn' (cuDNN flash attention, GPU, bf16/
      #                         fp16), 'splash' (Pallas splash attention, TPU; Pallas interpret mode on CPU, for
      #                         tests), 'xla' (plain masked softmax attention, any backend), 'cpu_blocked' (query
      #                         blocks that skip the masked upper triangle; fastest on CPU). 'auto' = cudnn on GPU,
      #                         splash on TPU, cpu_blocked on CPU, falling back to 'xla' with a one-line warning
      #                         where the kernel cannot serve the shapes or dtype.
      context_parallel="ring",  # with mesh.sequence > 1 (dpo_jax/context_parallel.py): 'ring' passes K/V blocks
      #                           around the axis (ppermute, online softmax; O(T / n) memory per device, any
      #                           backend, its own jnp tiles), 'all_gather' gathers K/V and runs attention_impl's
      #                           kernel on the local queries (O(T) K/V per device; 'auto', 'xla', 'cudnn', or
      #                           'splash' on causal key windows, chunks padded to 128 tokens, not with 'striped').
      context_load_balance="zigzag",  # token order over the sequence shards, so causal attention costs every shard
      #                                 the same: 'zigzag' (shard i holds chunks i and 2n-1-i of 2n), 'striped'
      #                                 (tokens i, i+n, ...), 'none' (contiguous: the last shard works ~2n-1 times the
      #                                 first). Log-probs are unchanged by it.
      matmul_precision="default",  # 'highest' for full-fp32 matmuls on TPU (default there is bf16 passes).
      remat="auto",  # gradient checkpointing per layer: 'none' | 'full' | 'dots_saveable' | 'auto' ('full' when the
      #                estimated saved activations exceed half a device's memory left after params, AdamW, grads and
      #                pi_ref, else 'none'; the dry run and the trainer print the estimate).
      scan_layers=False,  # jax.lax.scan over layers: fast compile for deep models.
      logits_chunk_size="auto",  # log-probs computed this many positions at a time, never holding [2B, T, vocab]
      #                            logits (same numbers; memory grows with the chunk, not T); "0" = all at once;
      #                            'auto' = chunks of <= 256 MiB of logits per device when they exceed 1 GiB (the
      #                            dry run prints the choice; dpo_jax/logprobs.py's logits_chunk).
      weight_grad_gemm="auto",  # every projection's weight gradient x^T dy: 'row_major' transposes the narrower
      #                           of x and dy as its own array and runs a row-major GEMM (on XLA:CPU faster than
      #                           its strided copy of dy fused into the backward; README benchmark), 'xla' leaves
      #                           the layout to XLA; 'auto' = 'row_major' on CPU, 'xla' on GPU/TPU.
      num_experts=0,  # mixture of experts (dpo_jax/moe.py): E SwiGLU experts per MoE layer; 0 = dense MLPs.
      num_experts_per_tok=2,  # k: experts each token is routed to (softmax router, top-k).
      moe_intermediate_size=None,  # each expert's hidden width; None = intermediate_size (Mixtral).
      norm_topk_prob=True,  # renormalise the k routing weights to sum 1 (Mixtral: always; Qwen3-MoE: its flag).
      moe_layer_step=1,  # layer i (0-based) is MoE iff (i + 1) % moe_layer_step == 0 and i is not in
      #                    dense_layers (Qwen3-MoE's decoder_sparse_step and mlp_only_layers).
      dense_layers=(),  # layers that keep the dense MLP (Qwen3-MoE's mlp_only_layers).
      moe_impl="auto",  # how the experts run: 'ragged' (dropless: tokens sorted by expert through grouped
      #                   matmuls, jax.lax.ragged_dot), 'dense' (every expert on every token, one-hot combine: E / k
      #                   times the FLOPs, for tiny tests), 'capacity' (at most moe_capacity_factor * N k / E tokens
      #                   per expert, the rest dropped and counted); 'auto' = 'ragged'.
      moe_capacity_factor=1.25,  # 'capacity': slots per expert as a multiple of the balanced share N k / E (with
      #                            mesh.expert > 1: slots per peer in the all-to-all exchange).
      router_aux_loss_coef=0.0,  # the checkpoint's load-balancing coefficient (HF router_aux_loss_coef); the
      #                            default of loss.router_aux_coef.
  ))

  c.hf = ml_collections.ConfigDict(dict(
      model_path="",  # '' = a random init of config.model; else a local HF checkpoint folder (safetensors) whose
      #                 architecture and weights start the run; config.model then only sets param_dtype,
      #                 compute_dtype, matmul_precision, remat, scan_layers, logits_chunk_size,
      #                 weight_grad_gemm, attention_impl, context_*, moe_impl and moe_capacity_factor. Also the
      #                 tokenizer if data.tokenizer=''.
      reference_path="",  # '' = pi_ref is where DPO starts (the SFT result, else hf.model_path); else a separate HF
      #                     checkpoint folder (e.g. an SFT model) loaded as the frozen pi_ref.
      export=False,  # after DPO, write the policy as an HF folder (config.json, safetensors, tokenizer) that
      #                AutoModelForCausalLM.from_pretrained loads, to <workdir>/hf_export.
      trust_remote_code=False,  # let transformers run Python code shipped in a checkpoint or tokenizer folder (custom
      #                           tokenizer / config classes). Off: such a folder is an error. Weights are read from
      #                           safetensors only, never pickle, whatever this says.
  ))

  c.lora = ml_collections.ConfigDict(dict(
      rank=0,  # 0 = full fine-tuning. r > 0: the DPO stage trains rank-r LoRA adapters (dpo_jax/lora.py) on the
      #          frozen pi_ref, and pi_ref is that base with the adapters off (one copy of its weights); only the
      #          adapters get gradients, AdamW moments and checkpoints. SFT, when it runs, stays full fine-tuning.
      alpha=16.0,  # the update is scaled by alpha / rank (PEFT's lora_alpha).
      dropout=0.0,  # dropout on each adapter's input in DPO steps (PEFT's lora_dropout); never in evaluation.
      targets=("q_proj", "v_proj"),  # projections given adapters, PEFT's names: q_proj, k_proj, v_proj, o_proj,
      #                                gate_proj, up_proj, down_proj, or ('all-linear',). Default: PEFT's for Llama.
      init="peft",  # how fresh adapters start, B = 0 always: 'peft' draws A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
      #               init_lora_weights=True), 'gaussian' A ~ N(0, 1/r) (PEFT's 'gaussian'). At step 0 pi == pi_ref.
      adapter_path="",  # '' = fresh adapters (config.lora.init); else a PEFT adapter
      #                   folder (adapter_config.json + adapter_model.safetensors) to continue from; its r, alpha
      #                   and targets must equal the fields above.
      export="adapter",  # with hf.export: 'adapter' writes a PEFT folder (PeftModel.from_pretrained(base, folder)
      #                    loads it; a base that is not hf.model_path is written beside it, to <workdir>/hf_base),
      #                    'merged' an HF folder of base + (alpha / r) B A, 'both' the two (hf_export, hf_merged).
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # data-parallel replicas; -1 = all devices not used by the other axes.
      fsdp=1,  # params, grads and optimizer state sharded over this axis (ZeRO-3 style).
      expert=1,  # expert parallelism: an MoE model's experts split over this axis, tokens exchanged all-to-all
      #            (dpo_jax/moe.py); it also splits the batch, like data. Must divide model.num_experts.
      sequence=1,  # context parallelism: each sequence's tokens sharded over this axis (MaxText's 'sequence'),
      #              attention across it by model.context_parallel; for pairs too long for one device's memory.
      tensor=1,  # tensor parallelism over heads / MLP / vocab.
  ))
  c.sharding = ml_collections.ConfigDict(dict(
      rules=SHARDING_RULES,  # logical axis -> mesh axes, first match wins (docs/configs.md lists them).
  ))

  c.loss = ml_collections.ConfigDict(dict(
      type="sigmoid",  # dpo_jax.losses.LOSSES key (TRL's loss_type names); 'sigmoid' is DPO (seed eq. 7).
      #                  'simpo', 'orpo' and 'sft' are reference-free: no pi_ref is held while training.
      types=(),  # non-empty: a weighted sum of these LOSSES keys instead of loss.type, e.g. ('sigmoid', 'sft').
      weights=(),  # one weight per loss.types entry; () = all 1.0.
      beta=0.1,  # strength of the KL constraint; the implicit reward is beta * log(pi / pi_ref).
      router_aux_coef=ml_collections.config_dict.placeholder(float),  # MoE models: the router's load-balancing
      #                 loss (transformers' load_balancing_loss_func over the policy's forward, padding masked) times
      #                 this is added to every loss type; None = model.router_aux_loss_coef (the checkpoint's).
      router_z_coef=0.0,  # MoE models: ST-MoE's router z-loss (mean logsumexp(router logits)^2) times this.
      label_smoothing=0.0,  # eps of the label-noise variants (sigmoid = cDPO, robust, exo_pair, aot, simpo),
      #                       in [0, 0.5); an error for types that do not use it.
      f_divergence_type="reverse_kl",  # f-DPO (Wang 2023): 'reverse_kl' (DPO), 'forward_kl', 'js_divergence' or
      #                                  'alpha_divergence'; non-reverse only for sigmoid, sigmoid_norm, hinge, ipo,
      #                                  exo_pair, robust, discopop, sft, rpo (losses.F_DIVERGENCE_LOSSES).
      f_alpha_divergence_coef=0.5,  # 'alpha_divergence': TRL's coefficient a > 0 (1 = reverse KL, 0 = forward KL).
      ld_alpha=_option(),  # LD-DPO (Liu 2024): weight in [0, 1] of the tokens past a pair's shared length, in
      #                      policy and reference log-probs (1 = plain DPO); None = off. Pair losses only.
      use_weighting=False,  # WPO (Zhou 2024): multiply each pair's loss by the policy's length-normalised
      #                       (aligned) probability of both responses; not with aot / aot_pair.
      desirable_weight=1.0,  # unpaired types (kto, apo_zero_unpaired, bco): weight of desirable rows' losses. TRL's
      #                        KTO recommends desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
      #                        in [1, 4/3].
      undesirable_weight=1.0,  # unpaired types: weight of undesirable rows' losses (see desirable_weight).
      options=ml_collections.ConfigDict(dict(  # per-variant options (floats); None = the variant's default.
          rpo_alpha=_option(),  # 'rpo': weight of the chosen-NLL term (default 1.0).
          simpo_gamma=_option(),  # 'simpo': target reward margin gamma (default 0.5).
          orpo_lambda=_option(),  # 'orpo': weight of the odds-ratio term (default: beta, as TRL's ORPOTrainer).
          discopop_tau=_option(),  # 'discopop': temperature of the log-ratio modulation (default 0.05).
          delta=_option(),  # 'bco_pair': fixed reward shift (default 0, as TRL 1.16; TRL 0.x kept a running mean).
      )),
  ))

  c.ref_update = ml_collections.ConfigDict(dict(
      mode="off",  # TR-DPO (Gorbatovski 2024): 'off' keeps pi_ref frozen; 'soft' moves it toward the policy, 'hard'
      #              copies the policy into it, every ref_update.tau DPO steps (needs a reference model in the step).
      alpha=0.6,  # 'soft': ref <- alpha * policy + (1 - alpha) * ref, alpha in (0, 1]; 'hard' is alpha = 1.
      tau=512,  # DPO optimizer steps between reference updates (after steps tau, 2 tau, ...).
  ))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3,  # peak learning rate.
      schedule="cosine",  # decay after warmup: 'cosine' | 'linear' | 'constant'.
      warmup_steps=10,  # linear warmup from 0, in optimizer steps.
      total_steps=400,  # DPO optimizer steps; the schedule reaches end_lr_ratio here.
      end_lr_ratio=0.1,  # final learning rate as a fraction of the peak.
      b1=0.9,  # Adam first-moment decay.
      b2=0.999,  # Adam second-moment decay.
      eps=1e-8,  # Adam epsilon (added to the sqrt of the second moment, as torch AdamW).
      weight_decay=0.0,  # decoupled (AdamW) decay on matrices only.
      max_grad_norm=1.0,  # global-norm clipping; 0 disables.
      grad_accum_steps=1,  # micro-batches per optimizer step (batch_size must divide by it).
  ))

  c.batch_size = 32  # global preference pairs per optimizer step (2x sequences per forward).
  c.max_length = 32  # tokens per sequence: prompt + response + EOS (padded to this).
  c.max_prompt_length = 12  # prompt tokens kept (its end) before the response.

  c.online = ml_collections.ConfigDict(dict(  # stage 'online_dpo' (dpo_jax/train/online.py)
      rounds=40,  # rounds of: sample the round's prompts, judge, pair, DPO steps (as config.loss, optim, batch_size,
      #             lora and mesh say). pi_ref stays where the stage started.
      steps_per_round=1,  # DPO optimizer steps per round (config.batch_size pairs each): 1 = online DPO (TRL's
      #                     OnlineDPOTrainer); more = iterative DPO (Dong et al. 2024). The schedule spans
      #                     rounds * steps_per_round steps (config.optim.total_steps is not used).
      prompts_per_round=32,  # training prompts sampled per round (the data's prompt column, each prompt once per
      #                        pass, shuffled); must divide by the data-parallel size.
      samples_per_prompt=2,  # n >= 2 responses per prompt; the pair is the judge's best against its worst.
      keep_pairs=False,  # True: each round trains on the pairs of every round so far (iterative DPO's growing
      #                    dataset); False: on this round's pairs only.
      judge="synthetic",  # who scores the samples: 'synthetic' (r* of the embedded task), 'reward_model' (a folder
      #                     from --config.stage=reward_model), 'hf' (an HF *ForSequenceClassification folder, its
      #                     own tokenizer, Llama / Mistral / Qwen2 / Qwen3), 'callable' (a Python function).
      judge_path="",  # 'reward_model': the folder ('' = <workdir>/reward_model); 'hf': the checkpoint folder;
      #                 'callable': 'module:function' (or 'path/file.py:function'), called as fn(prompts,
      #                 completions) on flat lists of strings and returning one float per completion.
      judge_batch_size=64,  # sequences per reward-model forward ('reward_model', 'hf').
      tie_margin=0.0,  # a prompt whose best and worst scores differ by <= this has no pair (dropped, counted).
      max_new_tokens=0,  # sample length cap, tokens; 0 = max_length - max_prompt_length (a pair fits one row).
      temperature=1.0,  # sampling temperature (the logged KL is an unbiased estimate only at 1.0).
      top_k=0,  # sample from the k most likely tokens; 0 = all.
      top_p=1.0,  # nucleus sampling mass; 1.0 = all.
  ))

  c.reward_model = ml_collections.ConfigDict(dict(  # stage 'reward_model' (dpo_jax/train/reward_model.py)
      steps=400,  # Bradley-Terry updates from pi_ref (its backbone, a zero scalar head) on the training pairs.
      batch_size=32,  # pairs per update; must divide by the data-parallel size.
      learning_rate=3e-4,  # peak learning rate (AdamW settings and schedule from config.optim).
      warmup_steps=10,  # linear warmup steps.
  ))

  c.sft = ml_collections.ConfigDict(dict(
      steps=300,  # SFT optimizer steps (0 skips SFT: pi_ref is then the initial params).
      batch_size=32,  # global sequences (chosen responses) per SFT step.
      learning_rate=2e-3,  # peak SFT learning rate (the rest of the schedule follows config.optim).
      warmup_steps=20,  # SFT linear warmup steps.
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=100,  # held-out preference metrics every this many DPO steps (0: only at the end).
      batch_size=64,  # pairs per eval batch (padded at the end, never dropped).
      num_prompts=200,  # held-out prompts sampled for reward / KL (0 skips sampling).
      samples_per_prompt=2,  # samples drawn per held-out prompt.
      max_new_tokens=24,  # sample length cap, tokens.
      temperature=1.0,  # 1.0 = ancestral sampling from pi, as the KL estimate assumes.
  ))

  c.perf = ml_collections.ConfigDict(dict(
      peak_flops=0.0,  # peak FLOP/s per device that perf/mfu divides by; 0 = the published dense bf16 peak of the
      #                  device kind (dpo_jax/flops.py), or on CPU a matmul measured at start-up.
      device_memory_gib=0.0,  # --dry_run: memory per device to check the plan against (e.g. 95 for a TPU v5p
      #                         chip, 80 for an H100); 0 = no check (a TPU topology's dry run: its chip's HBM).
      compile_cache="auto",  # JAX's persistent compilation cache folder: reruns, resumes and sweep members read
      #                        compiled steps instead of compiling (dpo_jax/train/compile_cache.py). 'auto' =
      #                        $JAX_COMPILATION_CACHE_DIR, else ~/.cache/dpo_jax/xla; '' = off.
  ))

  c.dry_run = ml_collections.ConfigDict(dict(
      topology="",  # --dry_run for a TPU slice: '' = the CPU-mesh dry run over this process's devices; else a Cloud
      #               TPU accelerator type or chip grid ('v5p-64', 'v5p:4x4x4', 'v4-32', 'v5e-16', 'v6e-256') whose
      #               steps the TPU compiler AOT-compiles on this host (pip install -e '.[tpu]'; no TPU needed).
      num_slices=1,  # TPU slices joined by the data-center network; mesh.data spans them (a multiple of this).
      steps=("dpo", "sft", "eval"),  # steps a topology's dry run compiles, of those the stage runs: 'dpo' (the
      #                                train step; LoRA's when lora.rank > 0), 'sft', 'eval' (held-out metrics).
  ))

  c.resume_with_changes = False  # True: resume a stage although fields that change its math or data order (loss,
  #                                optimizer, batch, data, model, seed, lora, ...) differ from its checkpoint's; off,
  #                                such a resume is an error listing them (logging, eval and checkpoint fields are free).
  c.log_every_steps = 20  # metrics to stdout / metrics.jsonl / TensorBoard.
  c.checkpoint_every_steps = 200  # orbax checkpoint of state + data position (and one at each stage's end).
  c.max_checkpoints = 2  # checkpoints kept per stage.
  c.progress_bar = True  # tqdm bar with loss, accuracy and tokens/s.

  if arg == "tiny":
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    c.batch_size = 8
    c.optim.update(total_steps=20, warmup_steps=2)
    c.sft.update(steps=20, batch_size=8, warmup_steps=2)
    c.eval.update(every_steps=10, batch_size=32, num_prompts=16, samples_per_prompt=1, max_new_tokens=12)
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.online.update(rounds=4, steps_per_round=2, prompts_per_round=8, samples_per_prompt=4)
    c.reward_model.update(steps=10, batch_size=8, warmup_steps=2)
  elif arg == "1b":  # ~1.1B params (TinyLlama-1.1B's shape) for a GPU or TPU: bf16 compute, fp32 params and Adam
    c.model.update(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                   num_kv_heads=4, tie_embeddings=False, compute_dtype="auto", scan_layers=True)
    c.max_length, c.max_prompt_length = 2048, 1024
    c.batch_size = 8
  elif arg == "lora":  # DPO with rank-8 adapters on every projection of the pi_ref that SFT makes
    c.lora.update(rank=8, alpha=16.0, targets=("all-linear",))  # same lr as full fine-tuning (README: LoRA DPO)
  elif arg == "moe":  # a Mixtral-style mixture of experts (8 experts, top-2, every layer), the default's other sizes
    c.model.update(intermediate_size=88, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001)
  elif arg == "qwen3-30b-a3b":  # Qwen3-30B-A3B's shape (HF config.json); 64 chips: v5p-128 (v5p-N counts cores)
    c.model.update(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                   num_kv_heads=4, head_dim=128, qk_norm=True, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                   norm_topk_prob=True, router_aux_loss_coef=0.001, compute_dtype="auto", scan_layers=True)
    c.max_length, c.max_prompt_length = 4096, 2048
    c.batch_size = 64  # one pair per device: the batch splits over data x fsdp x expert
    c.sft.batch_size = 64
    # experts over 'expert' (16 per chip), everything over 'fsdp': the rest of the devices (8 of 64, 4 of 32)
    c.mesh.update(data=1, fsdp=-1, expert=8)
    c.perf.device_memory_gib = 95.0  # a TPU v5p chip's HBM: the dry run says whether the plan fits
  elif arg not in (None, ""):
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; use one of: tiny, 1b, lora, moe, qwen3-30b-a3b.")
  return c
