"""The ``bastion`` command line, one module per topic.

:mod:`gateway.cli` builds the top-level typer app from these: ``serve`` and ``dev`` are
top-level commands; ``keys``, ``secrets``, ``inference`` and ``config`` are sub-apps
mounted with ``add_typer`` (as ``audit`` and ``compliance`` from compliance/). Helpers
shared by several topics (the error line, loading settings, the key store, recording a
CLI action in the audit log) live in :mod:`gateway.commands.common`.
"""
