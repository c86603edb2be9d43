"""The one exception type for errors a user can cause and fix."""


class MoeOffloadError(Exception):
    """A bad path, an unsupported model, a budget below the minimum, a corrupted store...

    The message says what went wrong and what to do; the CLI prints it without a traceback.
    """


class StoreCorruptError(MoeOffloadError):
    """The store on disk does not match its manifest (truncated file, failed checksum)."""
