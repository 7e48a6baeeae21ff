"""The one retry layer around storage calls, bounded: which errors are retried, how often, how long.

Every storage call retries in exactly one place, so waits never multiply in an outage (s3fs over
botocore over a loop of ours used to make up to 5 x 5 x 5 requests of one call):

- `storage.*` on s3://, local paths and memory:// retry here. s3fs's retry loop and botocore's are
  off (pipeline/clients.py), so a call makes at most `ATTEMPTS` requests (6; `SELFSUP_IO_RETRIES`)
  and sleeps at most `wait_bound(ATTEMPTS)` between them: 0.5 + 1 + 2 + 4 + 8 = 15.5 s. Each
  request is bounded by s3fs's timeouts: 5 s to connect, 15 s per read.
- `storage.*` on gs:// retry in gcsfs, whose loop is fixed in its code (gcsfs.retry.retry_request:
  6 requests, sleeps of min(2^(k-1) + U(0, 1), 32) s, at most `GCSFS_WAIT_BOUND` = 36 s) with no
  option to turn it off; so a gs:// call makes one attempt here. Each request is bounded by the
  timeouts pipeline/clients.py gives gcsfs: 5 s to connect, 15 s per read.
- Ray Train's checkpoint I/O (`storage.arrow_filesystem`) has no layer of ours: on s3:// botocore's
  standard mode retries it, `ATTEMPTS` requests, sleeps of at most 1 + 2 + 4 + 8 + 16 = 31 s; on
  gs:// gcsfs does, as above.

So an outage fails a call after at most 15.5 s asleep on s3:// (36 s on gs://) plus its requests'
own time, with StorageUnavailable naming the URL (redacted). The other loops around storage calls
retry no failure: claim loops (line files, manifest parts, results) retry a lost race only and let
storage errors through; a lease's renewal thread tries again next period until the lease expires.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import time
from typing import Callable, Optional, TypeVar

from selfsup.pipeline.redaction import redact_text

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = int(os.environ.get("SELFSUP_IO_RETRIES", "6"))
BASE_DELAY = 0.5  # seconds before the first retry; doubles per retry
MAX_DELAY = 8.0   # the longest single sleep
GCSFS_WAIT_BOUND = 36.0  # gcsfs.retry.retry_request: sleeps min(U(0,1) + 2^(k-1), 32) for k = 1..5

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                  NotADirectoryError, ValueError, TypeError, KeyError)
_TRANSIENT_NAMES = ("Timeout", "ConnectionError", "ConnectionClosed", "EndpointConnectionError",
                    "ServerDisconnected", "ClientOSError", "ClientConnectorError", "SlowDown",
                    "ServiceUnavailable", "InternalError", "ResponseStreamingError", "IncompleteRead")
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
_TRANSIENT_ERRNOS = {errno.EIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EAGAIN, errno.EBUSY, errno.ENETUNREACH, errno.EHOSTUNREACH}


class StorageUnavailable(ConnectionError):
    """Storage kept failing with transient errors until the retries ran out; names the (redacted) URL."""


def is_transient(exc: BaseException) -> bool:
    """Whether an I/O error is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    chain = [e for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    if any(t in type(e).__name__ for e in chain for t in _TRANSIENT_NAMES):
        return True
    if any(_transient_reply(e) for e in chain):
        return True
    if isinstance(exc, OSError):
        text = str(exc)
        return exc.errno in _TRANSIENT_ERRNOS or any(c in text for c in ("500", "502", "503", "504"))
    return False


def _transient_reply(exc: BaseException) -> bool:
    """Whether an error carries a store's reply that asks for a retry: 408, 429, 5xx, or such an S3 error code.

    s3fs turns botocore's ClientError into a plain OSError (a 500 becomes errno 121, "injected"), so the
    reply is read from the ClientError it chains to.
    """
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if resp.get("Error", {}).get("Code") in _TRANSIENT_CODES:
            return True
    else:
        status = getattr(exc, "code", None)  # gcsfs's HttpError
    return isinstance(status, int) and (status in (408, 429) or 500 <= status < 600)


def wait_bound(attempts: int, base_delay: float = BASE_DELAY) -> float:
    """The most seconds `retry` sleeps over `attempts` attempts (the requests' own time aside)."""
    return sum(min(MAX_DELAY, base_delay * 2 ** k) for k in range(attempts - 1))


def retry(fn: Callable[[], T], what: str, attempts: Optional[int] = None,
          base_delay: Optional[float] = None, by: str = "") -> T:
    """Call `fn`, retrying transient errors with jittered exponential backoff.

    `what` is the redacted URL that messages name. Sleeps between attempts total at most
    `wait_bound(attempts)`. Once the attempts run out, raises StorageUnavailable naming `what`,
    the attempts (`by` names who made them) and the time spent, chained to the last error; other
    errors pass through at once.
    """
    n = ATTEMPTS if attempts is None else max(1, attempts)
    base = BASE_DELAY if base_delay is None else base_delay
    start = time.monotonic()
    for attempt in range(n):
        try:
            return fn()
        except BaseException as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or isinstance(e, StorageUnavailable):
                raise
            if attempt == n - 1:
                raise StorageUnavailable(f"{what}: {type(e).__name__} after {n} attempt(s){by} over "
                                         f"{time.monotonic() - start:.1f}s: {redact_text(str(e))}") from e
            delay = min(MAX_DELAY, base * 2 ** attempt) * (0.5 + 0.5 * random.random())
            log.warning("transient error on %s (%s); retry %d/%d in %.1fs",
                        what, type(e).__name__, attempt + 1, n - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
