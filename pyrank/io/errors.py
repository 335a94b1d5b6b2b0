class PyrankIOError(ValueError):
    """Bad input or output location; the message names the file or tensor."""


def short(exc) -> str:
    """An exception's message cut to its first line (≤ 200 characters), or its type's name if
    it has none: what the readers' one-line errors quote of a library's error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
