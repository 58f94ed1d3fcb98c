"""The HTTP API: a thin FastAPI layer over :mod:`atp` (no inventory logic here)."""

from .app import create_app

__all__ = ["create_app"]
