"""`randygpt serve`: an OpenAI-compatible HTTP server and a web playground for a checkpoint.

    engine.py   the decode loop: one thread, one Session, every request's streams batched
    schemas.py  request bodies (the OpenAPI schema) and OpenAI-shaped errors
    chat.py     the plain-text chat template
    app.py      create_app(checkpoint_or_model, ...) -> the FastAPI app
    static/     the playground page, served at /

Needs the `serve` extra (fastapi, uvicorn); nothing else in randygpt imports this package.
"""
