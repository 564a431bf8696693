"""One side of a benchmark in its own process: ``python benchmarks/worker.py MODULE SIDE OPTIONS_JSON``.

Builds ``MODULE.WORKERS[SIDE](**options)``, calls its ``setup()`` (build, load, warm up) and prints
``READY <json>``; then for each ``run`` line on stdin prints ``RESULT <json>`` of one repetition, until ``quit``.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings


def main() -> None:
    module_name, side, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    warnings.filterwarnings("ignore")
    module = importlib.import_module(module_name)
    worker = module.WORKERS[side](**options)
    info = worker.setup() or {}
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "run":
            print("RESULT " + json.dumps(worker.run()), flush=True)


if __name__ == "__main__":
    main()
