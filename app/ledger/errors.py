"""Errors the ledger raises; the HTTP layer maps each to a problem+json status."""


class LedgerError(Exception):
    """Base class: the message is safe to show to the API's caller."""


class NotFound(LedgerError):
    pass


class StateConflict(LedgerError):
    """A guarded transition found the row in another state than expected."""


class Invalid(LedgerError):
    pass
