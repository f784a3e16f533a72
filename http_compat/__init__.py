"""REST shim: the existing GUI's HTTP contract served over the engine facade.

``create_app(engine, settings)`` builds the FastAPI app; ``HttpServer(engine, settings)`` runs it
with uvicorn in a background thread (``start``/``stop``/``port``). Importing does nothing else.
"""

from http_compat.app import create_app
from http_compat.server import HttpServer
from http_compat.settings import HttpSettings

__all__ = ["HttpServer", "HttpSettings", "create_app"]
