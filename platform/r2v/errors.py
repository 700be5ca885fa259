"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class R2VError(Exception):
    """A problem the user can fix: the message names the file, key or field, and the fix."""


class ConfigError(R2VError):
    pass


class ShardError(R2VError):
    pass
