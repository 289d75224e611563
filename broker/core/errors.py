"""The broker's exception tree. Every class carries the error-frame ``code`` it maps to.

::

    BrokerError                      code=internal
    ├── ProtocolError                code=bad_request      (malformed frame, wrong type, unknown op)
    │   ├── PayloadTooLargeError     code=payload_too_large
    │   └── InvalidNameError         code=bad_request      (topic/group name breaks the key schema)
    ├── UnauthorizedError            code=unauthorized
    ├── ForbiddenError               code=forbidden
    ├── RateLimitedError             code=rate_limited     (retry_after_ms)
    ├── NotFoundError                code=not_found
    ├── StaleReceiptError            code=stale_receipt    (late ack/nack/extend after the lease moved on)
    ├── UnavailableError             code=unavailable      (Redis down, breaker open, shutting down; retry_after_ms)
    │   └── StoreRefusedError        code=unavailable      (Redis refused a write: OOM, MISCONF, READONLY)
    └── ConfigError                  code=internal         (bad settings; raised at startup only)

The set of codes is closed: ``ERROR_CLASSES`` maps each code to the class the broker raises for it (and a client
rebuilds from an error frame); ``ERROR_CODES`` is its keys. Nothing outside this module invents a code.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class ProtocolError(BrokerError):
    code = "bad_request"


class PayloadTooLargeError(ProtocolError):
    code = "payload_too_large"


class InvalidNameError(ProtocolError):
    code = "bad_request"


class UnauthorizedError(BrokerError):
    code = "unauthorized"


class ForbiddenError(BrokerError):
    code = "forbidden"


class RateLimitedError(BrokerError):
    code = "rate_limited"


class NotFoundError(BrokerError):
    code = "not_found"


class StaleReceiptError(BrokerError):
    code = "stale_receipt"


class UnavailableError(BrokerError):
    code = "unavailable"


class StoreRefusedError(UnavailableError):
    """Redis answered but refused to store (maxmemory/noeviction, MISCONF, READONLY)."""


class ConfigError(BrokerError):
    code = "internal"


#: code -> the class raised for it on the node and rebuilt from an error frame by a client. One class per code (the
#: subclasses sharing a code, ``InvalidNameError``, ``StoreRefusedError``, ``ConfigError``, are node-side details).
ERROR_CLASSES: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        UnauthorizedError,
        ForbiddenError,
        PayloadTooLargeError,
        RateLimitedError,
        UnavailableError,
        NotFoundError,
        StaleReceiptError,
        BrokerError,
    )
}

ERROR_CODES = frozenset(ERROR_CLASSES)


def error_class(code: str) -> type[BrokerError]:
    """The class for an error frame's ``code``; an unknown code (a newer server) is a plain ``BrokerError``."""
    return ERROR_CLASSES.get(code, BrokerError)
