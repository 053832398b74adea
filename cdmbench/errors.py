"""User-facing errors: the CLI prints their message without a traceback and exits non-zero."""


class CdmbenchError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class RecipeError(CdmbenchError):
    """A recipe that does not validate; ``path`` is the dotted path of the bad key."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class RegistryError(CdmbenchError):
    """An unknown component name or a name registered twice."""


class PluginError(CdmbenchError):
    """A plugin that cannot be imported or that fails while registering."""


class CheckpointError(CdmbenchError):
    """A checkpoint that cannot be read."""


class Stopped(CdmbenchError):
    """Work stopped by SIGTERM / SIGINT after saving its state; the same command resumes it."""


class Interrupted(Stopped, KeyboardInterrupt):
    """Work stopped by SIGINT (Ctrl-C) after saving its state. The command line prints it as any
    ``CdmbenchError``; to any other caller it is also the ``KeyboardInterrupt`` Ctrl-C raises, so
    pytest, a notebook or a script's ``except KeyboardInterrupt`` stops there, as without cdmbench."""
