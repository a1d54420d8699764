"""The one error type for input the model cannot take, with a reason from a small fixed set.

The reason becomes a Prometheus label and an HTTP status, so it must stay a short closed list.
"""

from __future__ import annotations

# reason -> HTTP status. 413 for size, 415 for a kind of input we do not decode, 422 otherwise.
REASONS: dict[str, int] = {
    "empty": 422,
    "not_an_image": 415,
    "corrupt": 422,
    "too_many_pixels": 413,
    "too_large": 413,
    "too_many_items": 413,
    "bad_request": 400,
    "bad_field": 422,
    # Text: nothing left to classify, longer than the spec's max_chars, not valid UTF-8 (or
    # holding NUL, the mark of UTF-16 or binary data read as text).
    "empty_text": 422,
    "text_too_long": 413,
    "bad_encoding": 422,
}


class InputError(ValueError):
    """Input that cannot be turned into a model tensor; ``message`` is meant for the caller."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown input error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def status(self) -> int:
        return REASONS[self.reason]
