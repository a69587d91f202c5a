"""Built-in architectures (a registry) and the training loop that writes run directories."""

from .models import create_model, list_models, model_options, register_model

__all__ = ["create_model", "list_models", "model_options", "register_model"]
