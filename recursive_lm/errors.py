"""The one exception type of configuration errors, at the bottom of the import
graph so that every layer (config, plan, data, model) can raise it without
importing any other part of the package."""


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the values."""
