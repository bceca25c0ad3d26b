"""`aio-gateway mock-upstream`: an offline apiin.one for demos, tests and benchmarks."""

from .app import Settings, create_mock_app

__all__ = ["Settings", "create_mock_app"]
