"""``save_pretrained`` / ``push_to_hub`` as methods of every coopseg model.

The methods live in :mod:`coopseg.hub` (imported when called, so the models do not
depend on the engine); loading is ``coopseg.from_pretrained(dir_or_repo_id)``, which,
unlike huggingface_hub's ``ModelHubMixin.from_pretrained``, needs no class to call it
on: the folder's ``config.json`` names the architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class HubMixin:
    """Hugging Face Hub methods for a model built by ``coopseg.create_model``."""

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card
        (keyword arguments: :func:`coopseg.hub.save_pretrained`)."""
        from ..hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)  # type: ignore[arg-type]

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the :meth:`save_pretrained` folder to ``repo_id`` (needs a Hub token)."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)  # type: ignore[arg-type]
