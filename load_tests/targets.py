"""The routes the load runners call per model kind: one table for the Locust load test (locustfile.py) and the soak
(soak.py), kept out of locustfile.py because importing Locust monkey-patches the importing process (gevent)."""

from __future__ import annotations

# kind -> (action, weight in the load test's mix, image parts per request); the soak ignores the weights
ROUTES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "classifier": (("predict", 3, 1), ("proba", 1, 1), ("predict/batch", 1, 4)),
    "autoencoder": (("reconstruct", 1, 1), ("encode", 1, 1)),
}
