"""The `microscale` argument parser: a mistyped flag is reported by the subcommand that got it, under that
subcommand's usage and with the nearest flag it has ("did you mean"), not by the top-level parser's bare
"unrecognized arguments"; and LMDeploy's and vLLM's flag names are translated to microscale's once parsed."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from microscale.peer_names import apply_peer_flags


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (parsers of this class too) reject what they do not know themselves."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        try:
            apply_peer_flags(self, namespace)
        except ValueError as e:
            self.error(str(e))
        return namespace, extras

    def unrecognized(self, extras: list[str]) -> str:
        """argparse's message, with the closest flag of this parser for each mistyped one."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        suggestions: list[str] = []
        for arg in extras:
            if arg.startswith("-"):
                suggestions += difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1)
        return message + (f" (did you mean {' or '.join(dict.fromkeys(suggestions))}?)" if suggestions else "")
