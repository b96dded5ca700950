"""HTTP routers: speech, voices, system (health, models, tags, cache, metrics)."""
