"""Exception hierarchy. Every message names the problem and the fix, on one line."""


class S2LError(Exception):
    """Base class of every error s2l-guard raises on purpose."""


class ConfigError(S2LError):
    """A configuration file is malformed, has unknown keys, or out-of-range values."""


class DataError(S2LError):
    """A data set folder is missing files or has inconsistent metadata."""


class BundleError(S2LError):
    """A model folder has the wrong layout, shapes, or broken weights."""


class UnsafeWeightsError(BundleError):
    """A model folder holds pickle weights and the user did not trust them explicitly."""


class CacheError(S2LError):
    """The artifact store is unreadable or an artifact in it is incomplete."""


class SettingsError(ConfigError, ValueError):
    """A setting is out of range: a plugin's ``Settings``, or an argument that comes from a config."""


class InputError(S2LError, ValueError):
    """A function was given data it cannot use: wrong shape, NaN scores, unpaired samples."""
