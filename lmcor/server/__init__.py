"""`lmcor serve`: lmcor's models over HTTP (FastAPI on uvicorn; `pip install 'lmcor[serve]'`).

    from lmcor.server.config import ServeConfig
    from lmcor.server.runner import running
    with running(ServeConfig(port=0)) as server:
        ...  # POST f"{server.url}/v1/correct"

`config` (what to load, the limits; no web dependency, so `lmcor serve --help` runs without the
extra), `models` (the bundles, batched calls), `app` (routes, errors, auth, backpressure), `metrics`
(Prometheus), `runner` (uvicorn, signals, drain).
"""
