"""bench/chain_instructions.py's parts: the variants' settings (:mod:`.variants`) and what
the counted process runs (:mod:`.serving`); the script counts and reports."""
