"""The ASGI reverse proxy in front of the inference tier, and the `bastion` CLI."""
