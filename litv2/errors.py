"""The one exception type for user mistakes (bad config, missing data, unreadable checkpoint).

train.py / eval.py print it as a single line and exit non-zero, before any work is done.
"""
import os


class UserError(Exception):
    """A problem the user can fix; its message is the whole story (no traceback needed)."""


class WeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be had: a download that failed, or a downloaded file that does not load.

    A RuntimeError as well, like timm's own "no pretrained weights" error, for code that catches those.
    """


def os_error_words(e: OSError) -> str:
    """An OSError's cause in the errno's own words: "no space left on device", "read-only file system", ..."""
    if e.errno is not None:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__
