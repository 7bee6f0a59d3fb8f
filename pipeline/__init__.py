"""Wiring of the stages: typed API, command line, reports, web server."""

__version__ = "0.1.0"
