"""The project's exceptions. The CLI turns any of them into one line and exit code 2."""


class LmcorError(Exception):
    """Base class of every error lmcor raises on purpose."""


class BundleError(LmcorError):
    """A model bundle is missing, incomplete, corrupt or of an unknown format."""


class InputError(LmcorError):
    """A request cannot be served as given (empty source, too long, wrong types...)."""


class ExportError(LmcorError):
    """A checkpoint could not be exported, or its export failed validation."""
