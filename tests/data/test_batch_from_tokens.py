"""Bring your own batches: TRL-style token rows -> DPO batches (preference.batch_from_tokens), the example script
that replays a torch run (examples/reproduce_torch_run.py) against a plain PyTorch DPO loop, keyword
make_optimizer, and a train state with no mesh."""

import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, optim, step
from dpo_jax.train import runtime
from dpo_jax.data import preference

TINY = get_config("tiny")
TINY_MODEL = model_lib.ModelConfig.from_dict(TINY.model)
KEYS = ("input_ids", "attention_mask", "positions", "loss_mask")

# ---- a hand-made batch: 2 pairs, chosen rows first (TRL's concatenated forward), right and left padding ----
# row 0: pair 0 chosen, right-padded   row 1: pair 1 chosen, left-padded
# row 2: pair 0 rejected, right-padded row 3: pair 1 rejected, left-padded
IDS = [[5, 6, 7, 8, 0, 0], [0, 0, 3, 4, 5, 6], [5, 6, 9, 0, 0, 0], [0, 3, 4, 7, 7, 2]]
ATTENTION = [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]]
COMPLETION = [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_hand_made_rows_interleave_and_count_positions_over_real_tokens():
  out = preference.batch_from_tokens(np.array(IDS), np.array(ATTENTION), np.array(COMPLETION))
  # chosen_then_rejected -> interleaved: rows (0, 2) are pair 0, rows (1, 3) pair 1
  np.testing.assert_array_equal(out["input_ids"], [IDS[0], IDS[2], IDS[1], IDS[3]])
  np.testing.assert_array_equal(out["attention_mask"], [ATTENTION[0], ATTENTION[2], ATTENTION[1], ATTENTION[3]])
  np.testing.assert_array_equal(out["loss_mask"], [COMPLETION[0], COMPLETION[2], COMPLETION[1], COMPLETION[3]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 0, 0],   # right padding: 0 on padding
                                                   [0, 1, 2, 0, 0, 0],
                                                   [0, 0, 0, 1, 2, 3],   # left padding: the first real token is 0
                                                   [0, 0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(out["pair_mask"], [1, 1])
  assert all(v.dtype == np.int32 for v in out.values())
  same = preference.batch_from_tokens(IDS, ATTENTION, COMPLETION, layout="interleaved")  # lists; rows kept
  np.testing.assert_array_equal(same["input_ids"], IDS)
  np.testing.assert_array_equal(same["positions"][1], [0, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(same["pair_mask"], [1, 1])


@pytest.fixture(scope="module")
def made_batch():
  """make_batch's DPO batch of 4 pairs of the embedded task, and the same rows as TRL tensors (chosen first)."""
  tokenizer = runtime.load_tokenizer("")
  pairs, _, _, _ = runtime.load_pairs(TINY, tokenizer)
  batch = preference.make_batch(pairs, np.arange(4), kind="dpo")
  trl = {k: np.concatenate([batch[k][0::2], batch[k][1::2]]) for k in ("input_ids", "attention_mask", "loss_mask")}
  return batch, trl


def test_equals_make_batch_on_the_same_pairs(made_batch):
  batch, trl = made_batch
  for convert in (np.asarray, lambda x: x.tolist(), lambda x: x.astype(np.int64)):
    out = preference.batch_from_tokens(convert(trl["input_ids"]), convert(trl["attention_mask"]),
                                       convert(trl["loss_mask"]))
    for key in KEYS:
      np.testing.assert_array_equal(out[key], batch[key], err_msg=key)
      assert out[key].dtype == np.int32
    np.testing.assert_array_equal(out["pair_mask"], batch["pair_mask"])


def _left_padded(x_NxT, attention_NxT):
  """Each row's real tokens moved to the end of the row (left padding), padding (0) before them."""
  out = np.zeros_like(x_NxT)
  for r, (x, a) in enumerate(zip(x_NxT, attention_NxT)):
    real = x[a == 1]
    out[r, len(x) - len(real):] = real
  return out


def test_left_padding_gives_the_same_log_probs(made_batch):
  """The same pairs left-padded score exactly as right-padded: positions count real tokens only, and the first
  scored token is scored by the last prompt token whatever padding comes before the row."""
  _, trl = made_batch
  right = preference.batch_from_tokens(trl["input_ids"], trl["attention_mask"], trl["loss_mask"])
  attention = trl["attention_mask"]
  left = preference.batch_from_tokens(*(_left_padded(trl[k], attention)
                                        for k in ("input_ids", "attention_mask", "loss_mask")))
  np.testing.assert_array_equal(left["positions"][left["attention_mask"] == 1],
                                right["positions"][right["attention_mask"] == 1])
  model = model_lib.make_model(TINY_MODEL)
  params = model_lib.init_params(TINY_MODEL, jax.random.key(0))
  a = logprobs.sequence_logps(model, params, {k: jnp.asarray(v) for k, v in right.items()})
  b = logprobs.sequence_logps(model, params, {k: jnp.asarray(v) for k, v in left.items()})
  np.testing.assert_allclose(b.logps, a.logps, rtol=1e-5)
  np.testing.assert_array_equal(b.num_tokens, a.num_tokens)


# ---- validation: every error names the row (input numbering, with its pair and side) and the field ----

def _with(field, row, col, value):
  arrays = {"input_ids": np.array(IDS), "attention_mask": np.array(ATTENTION), "completion_mask": np.array(COMPLETION)}
  arrays[field][row, col] = value
  return arrays


BAD = {
    "negative id": (_with("input_ids", 1, 0, -100), "row 1 (pair 1, chosen), field 'input_ids': column 0 holds -100"),
    "mask value": (_with("attention_mask", 2, 1, 2), "row 2 (pair 0, rejected), field 'attention_mask': column 1"),
    "completion value": (_with("completion_mask", 3, 3, 5), "row 3 (pair 1, rejected), field 'completion_mask': "
                                                            "column 3 holds 5"),
    "scored padding": (_with("completion_mask", 0, 5, 1), "row 0 (pair 0, chosen), field 'completion_mask': column 5 "
                                                          "is 1 but attention_mask is 0"),
    "nothing scored": (_with("completion_mask", 2, 2, 0), "row 2 (pair 0, rejected), field 'completion_mask' is all 0"),
    "first token scored": (_with("completion_mask", 0, 0, 1), "row 0 (pair 0, chosen), field 'completion_mask': "
                                                              "column 0, the first token"),
    "first real token scored": (_with("completion_mask", 1, 2, 1), "row 1 (pair 1, chosen), field 'completion_mask': "
                                                                   "column 2, the row's first real token"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_name_the_row_and_the_field(case):
  arrays, message = BAD[case]
  with pytest.raises(ValueError, match=re.escape(message)):
    preference.batch_from_tokens(arrays["input_ids"], arrays["attention_mask"], arrays["completion_mask"])


def test_bad_shapes_types_and_layouts_name_the_field():
  ids, attention, completion = np.array(IDS), np.array(ATTENTION), np.array(COMPLETION)
  with pytest.raises(ValueError, match=r"field 'attention_mask' has shape \[4, 5\] but 'input_ids' has \[4, 6\]"):
    preference.batch_from_tokens(ids, attention[:, :5], completion)
  with pytest.raises(ValueError, match=r"field 'completion_mask' has shape \[6\]; expected \[N, T\]"):
    preference.batch_from_tokens(ids, attention, completion[0])
  with pytest.raises(ValueError, match="field 'input_ids' has 3 rows; .* N must be even"):
    preference.batch_from_tokens(ids[:3], attention[:3], completion[:3])
  with pytest.raises(ValueError, match="field 'input_ids' has rows of different lengths"):
    preference.batch_from_tokens([[1, 2, 3], [1, 2]], attention[:2, :3], completion[:2, :3])
  with pytest.raises(ValueError, match="field 'input_ids' has dtype float32; token ids must be integers"):
    preference.batch_from_tokens(ids.astype(np.float32), attention, completion)
  with pytest.raises(ValueError, match="field 'attention_mask' has dtype <U"):
    preference.batch_from_tokens(ids, attention.astype(str), completion)
  with pytest.raises(ValueError, match=r"field 'input_ids' has 1 columns; .* \(T >= 2\)"):
    preference.batch_from_tokens(ids[:, :1], attention[:, :1], completion[:, :1])
  with pytest.raises(ValueError, match="layout='rows'; use 'chosen_then_rejected'"):
    preference.batch_from_tokens(ids, attention, completion, layout="rows")
  # interleaved rows are named by their own pair: row 1 is pair 0's rejected response
  bad = _with("completion_mask", 1, 4, 0)
  bad["completion_mask"][1, 5] = 0
  with pytest.raises(ValueError, match=re.escape("row 1 (pair 0, rejected), field 'completion_mask' is all 0")):
    preference.batch_from_tokens(bad["input_ids"], bad["attention_mask"], bad["completion_mask"], layout="interleaved")


# ---- the example script against a plain PyTorch DPO loop ----

STEPS, ROWS, SEQ, VOCAB = 3, 4, 16, 64  # 3 steps of 2 pairs, right-padded, chosen first


def trl_batches(seed):
  """`[S, N, T]` TRL-style arrays: pair i = rows (i, i + N/2), one prompt per pair, pad id 0 (never a real token)."""
  rng = np.random.default_rng(seed)
  arrays = {k: np.zeros((STEPS, ROWS, SEQ), np.int64) for k in ("input_ids", "attention_mask", "completion_mask")}
  for s in range(STEPS):
    for i in range(ROWS // 2):
      prompt = rng.integers(1, VOCAB, size=rng.integers(2, 6))
      for r in (i, i + ROWS // 2):
        response = rng.integers(1, VOCAB, size=rng.integers(2, 9))  # its last token plays EOS
        p, n = len(prompt), len(prompt) + len(response)
        arrays["input_ids"][s, r, :n] = np.concatenate([prompt, response])
        arrays["attention_mask"][s, r, :n] = 1
        arrays["completion_mask"][s, r, p:n] = 1
  return arrays


def torch_dpo_losses(model, arrays, *, beta, lr, max_grad_norm):
  """Per-step losses of a plain PyTorch DPO loop on `arrays` (chosen rows first): policy = a copy of `model`,
  pi_ref = a frozen copy, sigmoid loss on sequence log-probs summed over completion_mask, logits shifted by one,
  global-norm clipping, one torch AdamW over every param (weight_decay=0, so which params decay cannot matter)."""
  import torch
  import torch.nn.functional as F
  policy, reference = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
  for p in reference.parameters():
    p.requires_grad_(False)
  optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  losses = []
  for s in range(arrays["input_ids"].shape[0]):
    ids = torch.as_tensor(arrays["input_ids"][s], dtype=torch.long)
    attention = torch.as_tensor(arrays["attention_mask"][s], dtype=torch.long)
    scored = torch.as_tensor(arrays["completion_mask"][s][:, 1:], dtype=torch.float32)  # token t by logits t - 1

    def sequence_logps(m):
      logits = m(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
      return (torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * scored).sum(-1)
    logps = sequence_logps(policy)
    with torch.no_grad():
      ref = sequence_logps(reference)
    b = ids.shape[0] // 2
    loss = -F.logsigmoid(beta * ((logps[:b] - ref[:b]) - (logps[b:] - ref[b:]))).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    losses.append(loss.item())
  return losses


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """(torch model, its save_pretrained folder): a random 2-layer Llama, norms randomised too."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from torch_models import random_hf_model
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  model = random_hf_model(config, seed=0)
  folder = tmp_path_factory.mktemp("tiny_llama")
  model.save_pretrained(folder)
  return model, str(folder)


def test_example_script_reproduces_a_pytorch_run(tiny_llama, tmp_path, capsys):
  from examples import reproduce_torch_run
  model, folder = tiny_llama
  arrays = trl_batches(0)
  np.savez(tmp_path / "batches.npz", **arrays)
  kw = dict(beta=0.1, lr=1e-3, max_grad_norm=1.0)
  ours = reproduce_torch_run.run(folder, str(tmp_path / "batches.npz"), layout="chosen_then_rejected",
                                 weight_decay=0.0, **kw)
  theirs = torch_dpo_losses(model, arrays, **kw)
  rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
  with capsys.disabled():  # the measured agreement, visible under pytest -s
    print(f"\nper-step losses: dpo_jax {ours}, torch {theirs}; relative differences {rel}")
  assert len(ours) == STEPS
  assert ours[0] == pytest.approx(np.log(2.0), rel=1e-6)  # policy == pi_ref: margin 0
  assert max(rel) <= 1e-5, (f"dpo_jax and torch disagree on the per-step loss (relative {rel}); "
                            "tests/interop/test_compare_torch.py narrows a one-step difference down to logits / grads.")
  # Steps 2 and 3 sit only ~1e-3 below log 2 (fresh batches, a small lr), so the stricter check is on that move:
  # the updates themselves agree, not just two numbers near log 2.
  moved = [(np.log(2.0) - a, np.log(2.0) - b) for a, b in zip(ours[1:], theirs[1:])]
  assert all(abs(b) > 1e-4 for _, b in moved), f"the loss did not move off log 2: {theirs}; nothing is compared"
  assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in moved), f"the updates differ: loss - log 2 = {moved}"
  printed = re.findall(r"^step (\d+) loss (\S+)$", capsys.readouterr().out, flags=re.M)
  assert [int(k) for k, _ in printed] == [1, 2, 3]
  np.testing.assert_allclose([float(v) for _, v in printed], ours, rtol=1e-7)


def test_example_script_reports_bad_batches_in_one_line(tiny_llama, tmp_path, capsys):
  from examples import reproduce_torch_run
  _, folder = tiny_llama
  arrays = trl_batches(1)
  arrays["completion_mask"][1, 2, 0] = 1  # step 2, row 2: the first token scored
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(SystemExit) as exit_info:
    reproduce_torch_run.main(["--model", folder, "--batches", str(tmp_path / "bad.npz")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'bad.npz'}, step 2: batch_from_tokens: row 2 (pair 0, rejected), "
                        "field 'completion_mask': column 0"), err
  assert "\n" not in err
  np.savez(tmp_path / "few.npz", input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"])
  with pytest.raises(ValueError, match=r"few.npz: no array\(s\) \['completion_mask'\]"):
    reproduce_torch_run.run(folder, str(tmp_path / "few.npz"))
  arrays["completion_mask"][1, 2, 0] = 0
  arrays["input_ids"][0, 1, 1] = VOCAB
  np.savez(tmp_path / "vocab.npz", **arrays)
  with pytest.raises(ValueError, match=f"step 1: row 1, field 'input_ids': column 1 holds {VOCAB} >= the model's"):
    reproduce_torch_run.run(folder, str(tmp_path / "vocab.npz"))
  with pytest.raises(ValueError, match="steps=4: .* holds 3 batches"):
    reproduce_torch_run.run(folder, str(tmp_path / "vocab.npz"), steps=4)


# ---- keyword make_optimizer and a train state with no mesh ----

def test_make_optimizer_keywords_equal_the_mapping():
  assert optim.DEFAULTS == dict(get_config().optim), "optim.DEFAULTS must equal configs/default.py's optim block"
  fields = dict(learning_rate=0.1, schedule="linear", warmup_steps=1, total_steps=5, weight_decay=0.5,
                max_grad_norm=0.5)
  by_keyword, schedule_k = optim.make_optimizer(**fields)
  by_mapping, schedule_m = optim.make_optimizer(dict(get_config().optim, **fields))
  over_mapping, _ = optim.make_optimizer(dict(get_config().optim, learning_rate=7.0), **fields)  # keywords win
  params = {"w": jnp.arange(6.0).reshape(2, 3), "scale": jnp.ones(3)}
  grads = {"w": jnp.full((2, 3), 0.3), "scale": jnp.array([1.0, -2.0, 0.5])}
  states = [opt.init(params) for opt in (by_keyword, by_mapping, over_mapping)]
  for k in range(3):
    assert float(schedule_k(k)) == float(schedule_m(k))
    updates = []
    for i, opt in enumerate((by_keyword, by_mapping, over_mapping)):
      u, states[i] = opt.update(grads, states[i], params)
      updates.append(u)
    for u in updates[1:]:
      jax.tree.map(np.testing.assert_array_equal, u, updates[0])
  with pytest.raises(ValueError, match="unknown field.*'learning_rat': did you mean 'learning_rate'"):
    optim.make_optimizer(learning_rat=1e-3)
  with pytest.raises(ValueError, match="pass grad_accum_steps to step.train_step"):
    optim.make_optimizer(grad_accum_steps=4)


def test_train_state_without_shardings_trains_on_one_device():
  params = model_lib.init_params(TINY_MODEL, jax.random.key(1))
  optimizer, schedule = optim.make_optimizer(learning_rate=1e-2, schedule="constant", warmup_steps=0)
  state = step.create_train_state(params, optimizer)
  leaves = jax.tree.leaves(state)
  assert all(len(x.sharding.device_set) == 1 for x in leaves)
  assert {d for x in leaves for d in x.sharding.device_set} == {jax.devices()[0]}
  train_step = jax.jit(functools.partial(step.train_step, model=model_lib.make_model(TINY_MODEL), optimizer=optimizer,
                                         schedule=schedule, loss_cfg=TINY.loss), donate_argnums=(0,))
  batch = preference.batch_from_tokens(IDS, ATTENTION, COMPLETION)
  state, metrics = train_step(state, params, batch)
  assert int(state.step) == 1
  assert float(metrics["loss"]) == pytest.approx(np.log(2.0), rel=1e-6)  # policy == pi_ref at the first step
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params)
  assert max(jax.tree.leaves(moved)) > 0, "the update changed nothing"
