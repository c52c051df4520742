"""The one exception type for mistakes a user can fix: each front end prints it as one line."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (flags, data, files, requests). The message says what is wrong and what to do.

    `field` names the setting at fault as the library knows it (a config field such as
    `temperature` or `n_embd`). The message spells it as the placeholder `{field}`; each front
    end renders that in its own words: the CLI as the flag (`--temperature`), the server as
    the JSON field (`temperature`). `str(e)` uses the field name itself.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def render(self, name_of=lambda field: field) -> str:
        """The message with `{field}` spelled by `name_of(field)`."""
        if self.field is None:
            return self.message
        return self.message.replace("{field}", name_of(self.field))

    def __str__(self) -> str:
        return self.render()
