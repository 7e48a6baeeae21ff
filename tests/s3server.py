"""moto_server's S3 API with atomic conditional writes, for the tests: `python tests/s3server.py HOST PORT`.

The server itself lives in selfsup.jobs.bench.s3server (the S3 pipeline bench starts it too).
"""
from __future__ import annotations

import sys

from selfsup.jobs.bench.s3server import main

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
