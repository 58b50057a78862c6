"""The proxy overhead benchmark (``bench/proxy_overhead.py``), one job per module.

- :mod:`.options`: the command line's options; :mod:`.cli`: the run, start to results file;
- :mod:`.catalog`: the targets, Bastion's variants and which are compared with which;
- :mod:`.targets`: the static upstream, nginx and LiteLLM (endpoints, starting them);
  :mod:`.bastion`: Bastion's variants, configured and started as deployments are;
- :mod:`.processes`: the servers' processes (tests/support.py's ManagedProcess, pinned to
  a core, stopped with their process group) and waiting for them to answer;
- :mod:`.redis_wire`: a private Redis and the two commands the run needs;
- :mod:`.bodies`: the bodies the upstream answers and the load sends;
- :mod:`.load`: the preflight request and the wrk runs; :mod:`.cpu`: a proxy's CPU time
  from /proc;
- :mod:`.report`: medians, overheads and costs, the tables; :mod:`.verdict`: the targets;
- :mod:`.environment`: versions and machine, for the results file.

The script puts the repository root on ``sys.path``; it needs the project's virtualenv
(tests/support.py's helpers import httpx and PyYAML).
"""
