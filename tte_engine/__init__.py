"""tte_engine: Think-Then-Embed multimodal embeddings on one shared KV cache.

    from tte_engine import Engine
    res = Engine("tiny-random").embed(["a cat on a chair", {"text": "what is this?", "image": "cat.jpg"}])
    res.embeddings  # [N, D] float32, L2-normalized
"""

import logging
import os

# kernels/ and export/ sit at the repository root and are installed as tte_engine.kernels and
# tte_engine.export (DESIGN §2). Imported straight from a checkout, without the install's mapping
# (PYTHONPATH=., a plain `pip install .` used from the repository root, or another interpreter's
# pip), they are found beside this package instead of failing with a circular-import error.
_checkout = os.path.dirname(__path__[0])
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and os.path.isfile(os.path.join(_checkout, "kernels", "_dispatch.py")):
    __path__.append(_checkout)

from .config import EngineConfig, TTEConfig
from .engine import EmbedResult, Engine
from .errors import CacheError, CapacityError, CheckpointError, ExportError, InvalidInputError, ModelOutputError, TTEError
from .inputs import Query
from .sampling import SamplingParams

logging.getLogger("tte_engine").addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "CacheError",
    "CapacityError",
    "CheckpointError",
    "EmbedResult",
    "Engine",
    "EngineConfig",
    "ExportError",
    "InvalidInputError",
    "ModelOutputError",
    "Query",
    "SamplingParams",
    "TTEConfig",
    "TTEError",
    "__version__",
]
