"""`tte-serve`: an OpenAI-compatible embeddings server over one Engine (`pip install tte-engine[serve]`).

    from tte_engine.serve import create_app, ServerSettings
    app = create_app(Engine("tiny-random"), ServerSettings(api_key="secret"))   # any ASGI server runs it
"""

from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
