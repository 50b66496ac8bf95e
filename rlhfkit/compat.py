"""Parameters accepted only for compatibility with the reference's API, gathered in one place.

The local engine ignores them. Each has the values that mean "nothing to do" here; any other value logs a
warning that says why it is ignored (once per owner and parameter).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

# name -> (values that need no warning, why the parameter is ignored)
IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "ttl_seconds": ((None, 604800), "local checkpoints never expire"),
    "store": ((None,), "checkpoints are always written under log_path"),
    "rolling_save_every": ((0,), "rolling checkpoints are not implemented; use save_every"),
    "rolling_ttl_seconds": ((7200,), "rolling checkpoints are not implemented"),
    "async_periodic_saves": ((False,), "local saves are synchronous"),
    "enable_trace": ((False,), "tracing is not implemented"),
    "span_chart_every": ((0,), "tracing is not implemented"),
    "submit_ahead": ((1,), "the local engine runs requests synchronously"),
    "reference_model_name": ((None,), "DPO's reference is the initial weights (spec 12)"),
    "both_ways": ((True,), "the win rate always judges both orders, as the reference does"),
}
_warned: set[tuple[str, str]] = set()


def compat_setting(name: str, default: Any) -> Any:
    """A dataclass field for an ignored parameter (its help text says why it is ignored)."""
    _, reason = IGNORED[name]
    return dataclasses.field(
        default=default,
        metadata={
            "help": f"accepted for compatibility; ignored: {reason}",
            "group": "compatibility (ignored)",
            "check": None,
        },
    )


def warn_ignored(owner: str, **values: Any) -> None:
    """Log a warning for each ignored parameter set to a value that would matter in the reference."""
    for name, value in values.items():
        accepted, reason = IGNORED[name]
        if value not in accepted and (owner, name) not in _warned:
            _warned.add((owner, name))
            logger.warning("%s: %s=%r is ignored (%s)", owner, name, value, reason)


def warn_ignored_fields(config: Any) -> None:
    """`warn_ignored` for the fields of a dataclass that are compatibility-only parameters."""
    warn_ignored(
        type(config).__qualname__,
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in IGNORED},
    )
