"""Errors raised for bad input before a federation starts."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting to change."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")
