"""tte_engine: Think-Then-Embed multimodal embeddings on one shared KV cache.

    from tte_engine import Engine
    res = Engine("tiny-random").embed(["a cat on a chair", {"text": "what is this?", "image": "cat.jpg"}])
    res.embeddings  # [N, D] float32, L2-normalized
"""

import logging

from .config import EngineConfig, TTEConfig
from .engine import EmbedResult, Engine
from .errors import CapacityError, CheckpointError, InvalidInputError, TTEError
from .inputs import Query
from .sampling import SamplingParams

logging.getLogger("tte_engine").addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "CapacityError",
    "CheckpointError",
    "EmbedResult",
    "Engine",
    "EngineConfig",
    "InvalidInputError",
    "Query",
    "SamplingParams",
    "TTEConfig",
    "TTEError",
    "__version__",
]
