"""The Ray Jobs API client that `selfsup submit` and `selfsup jobs` share: address, token, log following.

Ray 2.60 clusters started with `ray start` (or KubeRay with authOptions) check a bearer token on
every dashboard request. The token is found as Ray itself finds it, highest precedence first:
`--auth-token-file`, $RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
RAY_AUTH_MODE=disabled sends none. The token goes only into the Authorization header, never
into a job's runtime_env or metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_client_args(p: argparse.ArgumentParser) -> None:
    """--address and --auth-token-file."""
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                     "(default $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    p.add_argument("--auth-token-file", metavar="PATH",
                   help="file holding the cluster's token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                        "~/.ray/auth_token)")


def resolve_address(address: Optional[str]) -> str:
    """The dashboard address from the option or the environment; ValueError when there is none."""
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not found:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                         "RAY_API_SERVER_ADDRESS")
    if "://" not in found:
        found = f"http://{found}"
    return found


def auth_token(token_file: Optional[str] = None) -> Optional[str]:
    """The cluster token, or None (auth disabled, or no token anywhere)."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--auth-token-file")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    return _read_token(default, "default token file") if default.is_file() else None


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise FileNotFoundError(f"{what} {path} cannot be read ({e.strerror}); write the cluster's token "
                                "there (`ray get-auth-token` on the head node prints it)") from None
    if not token:
        raise ValueError(f"{what} {path} is empty; write the cluster's token there")
    return token


def connect(address: Optional[str], token_file: Optional[str] = None) -> Any:
    """A JobSubmissionClient for the cluster, sending its token; errors become one-line ValueErrors."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # noqa: BLE001 - requests/ray raise many types for an unreachable or refusing server
        raise ValueError(explain(e, url, token is not None)) from None


def explain(e: BaseException, url: str, sent_token: bool) -> str:
    """A one-line message for a failed Jobs API call, with what to do about auth failures."""
    text = " ".join(str(e).split())
    if "Authentication" in type(e).__name__ or "401" in text or "403" in text or "Unauthorized" in text:
        hint = ("the cluster rejected the token: check that it is the cluster's (`ray get-auth-token` on the head)"
                if sent_token else "the cluster demands a token: set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN), "
                                   "or pass --auth-token-file")
        return f"{url}: authentication failed; {hint}"
    return f"cannot reach the Ray Jobs API at {url} ({type(e).__name__}: {text[:300]})"


def follow(client: Any, job_id: str, poll: float = 1.0, out: Any = None) -> str:
    """Print the job's log as it grows until the job ends; returns its final status name."""
    out = out or sys.stdout
    shown = 0
    while True:
        status = status_name(client.get_job_status(job_id))  # before the logs, so a final read is complete
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)


def status_name(status: Any) -> str:
    """'SUCCEEDED' from a JobStatus (a str enum) or a plain string."""
    return str(getattr(status, "value", status))


def exit_code(status: str) -> int:
    """0 for SUCCEEDED, 1 for FAILED or STOPPED."""
    return 0 if status == "SUCCEEDED" else 1
