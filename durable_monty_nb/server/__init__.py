"""The HTTP face: signals and external call completions over HTTP, with capability tokens.

``durable-monty-nb serve --db URL`` (or ``%durable_serve`` in a kernel) runs :mod:`.app` with
uvicorn; it needs the ``server`` extra (``pip install 'durable-monty-nb[server]'``). The command
line pieces (``signal``, ``token``, ``serve``) are in :mod:`.cli`.
"""
