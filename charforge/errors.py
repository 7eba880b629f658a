"""One error model for everything a user can run: each error carries the exit code the command line ends with.

- 2 `InputError`: input or configuration the user must fix (a config file, a path, a reference, a flag).
- 3 `Refused`: a gate said no: promotion, quantization, servability (incl. train/serve parity), a rollout.
- 4 `Unavailable`: something charforge depends on does not answer or did not start: MLflow, the gateway, a vLLM
  server, a replica. Of these, only `Transient` failures are retried (see `is_transient`).

The CLI prints any `CharforgeError` as one line, `error: <message>`, and exits with its code; flows let them
propagate unchanged, so a Prefect run fails with the same message.
"""

from __future__ import annotations


class CharforgeError(Exception):
    """Base of the errors a user sees as one line; `exit_code` is what the command line ends with."""

    exit_code = 1


class InputError(CharforgeError, ValueError):
    """Input or configuration the user must fix; the message names it and the fix."""

    exit_code = 2


class ConfigError(InputError):
    """A config or data file is unusable; the message names the file, the key and the reason."""


class Refused(CharforgeError):
    """A gate refused: the artifact or decision must not go further. Not retried: it would refuse again."""

    exit_code = 3


class Unavailable(CharforgeError):
    """A dependency (MLflow, the gateway, vLLM, a replica) does not answer or did not start."""

    exit_code = 4


class Transient(Unavailable):
    """An unavailability that may pass by itself (a connection refused or reset, a replica still starting):
    the only kind of failure Prefect tasks retry."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: our `Transient`, or a connection-level failure of httpx, MLflow's REST client or Prefect's
    API client (refused, reset, timed out while connecting). Deterministic failures (bad input, a gate's refusal,
    a bug) are not: a retry would fail the same way and, for evaluation, start vLLM again first."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, CharforgeError):
        return False
    import httpx

    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                        httpx.PoolTimeout, ConnectionError)):
        return True
    try:  # MLflow's REST client raises MlflowException with a connection cause after its own retries
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency of the pipeline environment
        return False
    if isinstance(exc, MlflowException):
        text = str(exc)
        return any(s in text for s in ("Connection refused", "Max retries exceeded", "Failed to establish",
                                       "Connection reset", "Read timed out"))
    return False
