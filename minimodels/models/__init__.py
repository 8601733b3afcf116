"""The model table: `model.arch` in a config -> (config dataclass, model class).

The trainer builds models only through this table, so adding a model never touches the trainer.
"""

from minimodels.models.gpt import GPT, GPTConfig

MODELS = {
    "gpt": (GPTConfig, GPT),
}
MODEL_CONFIGS = {name: cfg for name, (cfg, _) in MODELS.items()}


def build_model(config):
    """Instantiate the model class registered for `config.arch`."""
    return MODELS[config.arch][1](config)


__all__ = ["GPT", "GPTConfig", "MODELS", "MODEL_CONFIGS", "build_model"]
