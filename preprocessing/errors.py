"""The one error type for input the model cannot take, with a reason from a small fixed set.

A reason says what is wrong with the input, never how a transport reports it: the service maps
reasons to HTTP statuses in one table (``service/app.py``). Reasons become Prometheus labels, so
they stay a short closed list.
"""

from __future__ import annotations

# reason -> what it means (for documentation: the service's error schema lists these).
REASONS: dict[str, str] = {
    "empty": "the input holds no data (an empty file)",
    "not_an_image": "the bytes are not an image format the spec allows",
    "corrupt": "the image cannot be decoded",
    "too_many_pixels": "the image has more pixels than the decompression-bomb limit",
    "bad_field": "a value has the wrong type (e.g. a text that is not a string)",
    # Text: nothing left to classify, longer than the spec's max_chars, not valid UTF-8 (or
    # holding NUL, the mark of UTF-16 or binary data read as text).
    "empty_text": "the text is empty once normalised",
    "text_too_long": "the text is longer than the spec's max_chars",
    "bad_encoding": "the text is not valid UTF-8 (or holds NUL)",
}


class InputError(ValueError):
    """Input that cannot be turned into a model tensor; ``message`` is meant for the caller."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown input error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
