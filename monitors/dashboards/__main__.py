"""``python -m monitors.dashboards build [--out DIR]``: ``bastion dashboards``, standalone."""

from monitors.dashboards.cli import dashboards_app

dashboards_app(prog_name="python -m monitors.dashboards")
