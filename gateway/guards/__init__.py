"""Input and output guards: scanners, the pipelines that run them, and their policies."""
