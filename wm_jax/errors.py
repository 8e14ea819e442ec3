"""Errors whose messages name user-settable options; the bottom layer (imports nothing from wm_jax).

Library code names an option as a `{name}` placeholder (a RunOptions field / CLI flag name without
dashes) and leaves its spelling to the front end: str(err) writes `name`, the CLI `--name`. Only
`{lowercase_identifier}` is a placeholder; other braces in a message are kept as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def render(template: str, style: Callable[[str], str]) -> str:
    """`template` with every `{name}` placeholder replaced by `style(name)`."""
    return _PLACEHOLDER.sub(lambda m: style(m.group(1)), template)


class TemplatedError(Exception):
    """Base of the errors whose message is a template that may name options as `{name}`."""

    def render(self, style: Callable[[str], str]) -> str:
        return render(str(self.args[0]) if self.args else "", style)

    def __str__(self) -> str:
        return self.render(str)


class OptionError(TemplatedError, ValueError):
    """A user-settable option has a bad value. `option` is its name (a RunOptions field / CLI flag name
    without dashes). The message is a template where {name} placeholders refer to options; str(err)
    renders them as `name`, and the CLI renders them as `--name`."""

    def __init__(self, option: str, template: str):
        super().__init__(template)
        self.option = option
