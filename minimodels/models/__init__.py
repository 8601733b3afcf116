"""The model table: `model.arch` in a config -> (config dataclass, model class).

The trainer builds models only through this table, so adding a model never touches the trainer.
"""

from minimodels.models.bert import BERT, BERTConfig
from minimodels.models.brivl import BriVL, BriVLConfig
from minimodels.models.glm import GLM, GLMConfig
from minimodels.models.gpt import GPT, GPTConfig
from minimodels.models.ptuning import PTuning, PTuningConfig
from minimodels.models.t5 import T5, T5Config
from minimodels.models.vqvae import VQVAE, VQVAEConfig
from minimodels.moe.parallel import shard_experts

MODELS = {
    "gpt": (GPTConfig, GPT),
    "bert": (BERTConfig, BERT),
    "t5": (T5Config, T5),
    "ptuning": (PTuningConfig, PTuning),
    "brivl": (BriVLConfig, BriVL),
    "glm": (GLMConfig, GLM),
    "vqvae": (VQVAEConfig, VQVAE),
}
MODEL_CONFIGS = {name: cfg for name, (cfg, _) in MODELS.items()}


def build_model(config):
    """Instantiate the model class registered for `config.arch`. With model.moe.expert_parallel, each
    process then keeps only its share of every MoE layer's experts (after the whole model is initialised,
    so that every process holds a slice of the same model)."""
    model = MODELS[config.arch][1](config)
    if getattr(config, "moe", None) is not None and config.moe.expert_parallel:
        shard_experts(model)
    return model


__all__ = ["BERT", "BERTConfig", "BriVL", "BriVLConfig", "GLM", "GLMConfig", "GPT", "GPTConfig", "PTuning", "PTuningConfig", "T5", "T5Config", "VQVAE", "VQVAEConfig",
           "MODELS", "MODEL_CONFIGS", "build_model"]
