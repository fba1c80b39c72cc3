"""The one exception type of configuration errors."""


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the values."""
