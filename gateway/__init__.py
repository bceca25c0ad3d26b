"""aio-gateway: the organisation-wide access point to the API in One (apiin.one) AI API."""

__version__ = "0.1.0"
