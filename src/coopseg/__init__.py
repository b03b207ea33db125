"""coopseg: cooperative learning for semantic segmentation."""

from .hub import from_pretrained
from .models import create_model

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "from_pretrained"]
