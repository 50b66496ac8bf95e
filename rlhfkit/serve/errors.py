"""The server's errors, and how each reaches the SDK.

- Raised while a POST is read (bad JSON or protobuf, an unknown id, a bad name): an HTTP 4xx with a JSON body
  `{"error", "category": "user"}`; the SDK does not retry those (except 408/409/429, which are never used
  for them) and raises an error carrying the message.
- Raised while a request runs (a wrong tensor shape, an unknown loss, a missing checkpoint): the request's
  future fails; `retrieve_future` answers `{"error", "category"}` with status 200, which the SDK raises as
  `tinker.RequestFailedError` from `.result()`.
"""

from __future__ import annotations

from rlhfkit.errors import UserError as _RlhfkitUserError


class ServeError(Exception):
    status = 500
    category = "server"


class UserError(ServeError, _RlhfkitUserError):
    """A request the user can fix; the message names the field."""

    status = 400
    category = "user"


class NotFound(UserError):
    status = 404


class Unauthorized(UserError):
    status = 401


class TooLarge(UserError):
    status = 413


def categorize(error: BaseException) -> tuple[str, str]:
    """(category, message) of an error raised while a request ran."""
    if isinstance(error, ServeError):
        return error.category, str(error)
    if isinstance(error, (_RlhfkitUserError, ValueError, KeyError, TypeError)):
        return "user", f"{type(error).__name__}: {error}" if not isinstance(error, _RlhfkitUserError) else str(error)
    return "server", f"{type(error).__name__}: {error}"
