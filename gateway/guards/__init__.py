"""Input and output guards: scanners, the pipelines that run them, and their policies.

``input_check.InputGuard`` (a request check) and ``output_filter.OutputGuard`` (an answer
filter source) are the entry points; ``settings.GuardSettings`` their configuration;
docs/guards.md the whole story. Nothing is imported here: the classifier and the
operator models load only when a pipeline is built.
"""
