"""`tte-serve`: an OpenAI-compatible embeddings server over one Engine (the `[serve]` extra).

    from tte_engine.serve import create_app, ServerSettings
    app = create_app(Engine("tiny-random"), ServerSettings(api_key="secret"))   # any ASGI server runs it
"""

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    # imported on first use, so that `tte-serve` (tte_engine.serve.main) can say which extra is missing
    # instead of failing on fastapi while this package is imported
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
