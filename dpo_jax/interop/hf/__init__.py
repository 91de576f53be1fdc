"""Hugging Face interop: `ModelConfig` from/to HF configs (families.py), params from/to HF state dicts
(layouts.py), checkpoint folders in and out (checkpoints.py), PEFT adapter folders (peft.py),
`*ForSequenceClassification` reward models in, scored as transformers scores them (reward_models.py).

The names a user calls are re-exported here, so `from dpo_jax.interop import hf` gives the whole API:

    cfg = hf.model_config_from_hf(hf_model.config, param_dtype="bfloat16")
    params = hf.params_from_hf_state_dict(hf_model.state_dict(), cfg)
    cfg, params = hf.load_hf_checkpoint("ckpt_dir", mesh=mesh, rules=rules)
    hf.save_hf_checkpoint(params, cfg, "out_dir", model_type="llama", tokenizer=tok)
    rm_cfg, rm_params, info = hf.load_sequence_classifier("rm_dir")
    scores = hf.score_texts(make_model(rm_cfg), rm_params, info, rm_tokenizer, texts)
"""

from dpo_jax.interop.hf.checkpoints import load_hf_checkpoint, save_hf_checkpoint
from dpo_jax.interop.hf.families import SUPPORTED_MODEL_TYPES, hf_config_from_model_config, model_config_from_hf
from dpo_jax.interop.hf.layouts import hf_state_dict_from_params, params_from_hf_state_dict
from dpo_jax.interop.hf.reward_models import load_sequence_classifier, score_texts

__all__ = ["SUPPORTED_MODEL_TYPES", "hf_config_from_model_config", "hf_state_dict_from_params", "load_hf_checkpoint",
           "load_sequence_classifier", "model_config_from_hf", "params_from_hf_state_dict", "save_hf_checkpoint",
           "score_texts"]
