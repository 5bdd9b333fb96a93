"""The base class of the project's user-facing errors.

Every error that means "your input is wrong or unusable" (a bad config, record, checkpoint or model
source, a memory plan that cannot fit, a run that diverged, a grading pool that cannot grade)
subclasses `UserError` as well as its usual built-in base, so callers can still catch
``ValueError`` etc. The entry points (`rema_jax.cli.run_main`) print a `UserError` as one
``error: <message>`` line and exit 2; any other exception keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message alone tells the user what to fix (no traceback needed)."""
