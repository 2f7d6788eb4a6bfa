"""The command-line help convention of the project's tools (training, benchmarks, load tests)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where there is none to show: an option whose default is None or empty
    takes it from elsewhere (the task's spec, the card, the newest version) or does nothing, as its own help says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)
