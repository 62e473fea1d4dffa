"""Run a scenario of scenarios.py in this process: ``python proc_runner.py DB_URL SCENARIO [resume]``.

Prints ``RESULT <repr>`` on success, ``BUSY <message>`` when another process drives the
execution (exit code 3).
"""

from __future__ import annotations

import sys

import scenarios

from durable_monty_nb import Engine, ExecutionBusy


def main() -> int:
    url, name = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "run"
    engine = Engine(url, lease_ttl=5.0)
    code, _ = scenarios.SCENARIOS[name]
    try:
        if mode == "resume":
            handle = engine.resume(name, scenarios.namespace(name))
        else:
            handle = engine.start(code, scenarios.namespace(name), key=name)
        print("STARTED", handle.execution_id, flush=True)
        result = handle.result()
    except ExecutionBusy as exc:
        print("BUSY", exc, flush=True)
        return 3
    print("RESULT", repr(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
