class PyrankIOError(ValueError):
    """Bad input or output location; the message names the file or tensor."""
