"""The HTTP edge: `create_app(settings)` and its lifespan (app.py), typed dependencies (deps.py),
middleware, the HTTP contract (schemas.py), thin routes, and the runtime the lifespan opens: the
served recommender, its hot reload and the /recommend micro-batcher."""
