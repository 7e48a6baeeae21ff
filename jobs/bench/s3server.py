"""moto_server's S3 API with conditional writes made atomic, as they are on S3.

`python -m selfsup.jobs.bench.s3server HOST PORT` serves what `moto_server -H HOST -p PORT` serves (moto's own
app, request handler and threaded werkzeug server), with one difference: moto checks a PUT's
If-None-Match / If-Match precondition and then stores the object without a lock, so two
concurrent conditional creates of one key can both succeed, which S3 never allows. Tests of
concurrent writers (manifest parts, line files, results, leases) need S3's guarantee, so such
PUTs are served one at a time here; every other request runs concurrently as in moto_server.
The test suite's S3 fixture (tests/s3server.py) and `selfsup bench pipeline --storage s3` serve it.
moto is a test dependency (`pip install -e .[test]`): nothing else in the package imports this module.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Iterable

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class AtomicConditionalPuts:
    """WSGI middleware: conditional PUTs run under one lock, from the precondition check to the stored object."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        conditional = "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ
        if environ.get("REQUEST_METHOD") != "PUT" or not conditional:
            return self.app(environ, start_response)
        with self.lock:
            return list(self.app(environ, start_response))  # the whole response, inside the lock


def main(host: str, port: int) -> None:
    """Serve until killed."""
    os.environ.setdefault("MOTO_PORT", str(port))  # as moto_server does
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, AtomicConditionalPuts(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
