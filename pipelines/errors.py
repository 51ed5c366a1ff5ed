"""The one exception tree of or-agent.

Library code raises these with a message that names the input and the problem; the command
line (``agent.cli``) turns any of them into a one-line error and a non-zero exit code, so a
user's mistake never shows as a traceback.
"""


class OrAgentError(Exception):
    """Base of every error or-agent raises on purpose."""

    exit_code = 1


class InputError(OrAgentError):
    """A file, directory, device or argument given by the user is missing or unusable."""

    exit_code = 2


class ManifestError(OrAgentError):
    """A model manifest is malformed, or does not match its model file."""

    exit_code = 3


class ModelError(OrAgentError):
    """A model could not be loaded or run."""

    exit_code = 4


class DependencyError(OrAgentError):
    """An optional dependency (torch, TensorRT, pycuda) is needed but not installed."""

    exit_code = 5
