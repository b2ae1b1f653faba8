"""The one exception type for user mistakes (bad config, missing data, unreadable checkpoint).

train.py / eval.py print it as a single line and exit non-zero, before any work is done.
"""


class UserError(Exception):
    """A problem the user can fix; its message is the whole story (no traceback needed)."""
