"""The one exception type of configuration errors (defined in `recursive_lm.errors`)."""

from recursive_lm.errors import ConfigError

__all__ = ["ConfigError"]
