"""Errors meant for people.

A `UserError` is something the user can fix (bad config, broker unreachable, missing model); the CLI
prints its message as one line and exits 2, without a traceback. Every other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""


class ConfigError(UserError):
    """The configuration is invalid; the message names the field."""


class BrokerError(UserError):
    """The Kafka broker could not be started or reached."""
