"""The guards' corpus: hand-written templates, the generator that renders them (build),
and the rendered JSONL files and classifier artefact."""
