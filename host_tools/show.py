"""What ``optogate demo`` shows a person: how to call the gateway, and each process live.

:class:`LiveView` is told about every change of a supervised process
(``changed``, called from the supervisor's reader threads) and draws, with
rich, a header (the LAN address, the CA file, the API key, the state
directory and an example ``optogate call`` and ``curl``) above a table of
the processes: pid, state, uptime, restarts and the last event each one
logged.  Deaths are printed in red with the end of the process's stderr,
once each, above the live table, so they stay on screen after it redraws.

Without a terminal (output piped to a file, or the tour) the table is not
redrawn; state changes are printed as plain lines instead.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Final

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from host_tools.launcher import Managed

if TYPE_CHECKING:
    from host_tools.demo import Appliance

#: Redraws per second: smooth enough for a person, cheap on a Pi.
REFRESH_PER_SECOND: Final = 2

_STATE_STYLE: Final = {
    "starting": "yellow",
    "running": "green",
    "powered off": "bold yellow",
    "stopped": "dim",
    "died": "bold red",
}


class LiveView:
    """Live status of the demo's processes; see the module docstring."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._app: Appliance | None = None
        self._lock = threading.Lock()
        self._reported: set[tuple[str, float]] = set()
        self._live: Live | None = None

    def attach(self, app: Appliance) -> None:
        """Show ``app``: print how to call it once."""
        self._app = app
        self.console.print(self.header())

    def header(self) -> Panel:
        """Return the panel that tells a person how to call the gateway."""
        app = self._app
        assert app is not None
        path = "internet (TCP+TLS)" if app.internet else "dial-up (modem emulators)"
        lines = [
            f"[bold]LAN API[/]   {app.url}",
            f"[bold]CA file[/]   {app.ca_file}",
            f"[bold]API key[/]   {app.api_key}",
            f"[bold]state[/]     {app.state_dir}   (logs in logs/, central.toml, outer.toml,"
            " inner.toml)",
            f"[bold]uplink[/]    {path}",
            "",
            f"  export OPTOGATE_URL={app.url} OPTOGATE_CA={app.ca_file}"
            f" OPTOGATE_API_KEY={app.api_key}",
            "  optogate call dxf2svg --input drawing.dxf --output drawing.svg",
            f"  curl --cacert {app.ca_file} -H 'Authorization: Bearer {app.api_key}'"
            f" {app.url}/v1/services",
            f"  optogate central --config {app.central_config} licence list",
            f"  optogate demo --state {app.state_dir} --send"
            """ '{"cmd": "power", "side": "a", "on": false}'   (outer module's power off)""",
        ]
        return Panel("\n".join(lines), title="optogate demo", expand=False)

    def table(self) -> Table:
        """Return the table of processes, in start order."""
        table = Table(expand=True)
        for column, width in (("process", 13), ("pid", 7), ("state", 15), ("up", 6), ("re", 2)):
            table.add_column(column, width=width, no_wrap=True)
        table.add_column("last event", ratio=1, overflow="ellipsis", no_wrap=True)
        app = self._app
        if app is None or app.supervisor is None:
            return table
        sup = app.supervisor
        for name in list(sup.order):
            m = sup.processes[name]
            state = m.state
            if m.exit_code is not None and state != "stopped":
                state = f"{state} ({m.exit_code})"
            up = f"{time.monotonic() - m.started_at:.0f} s" if m.state == "running" else "-"
            table.add_row(
                name,
                str(m.pid),
                Text(state, style=_STATE_STYLE.get(m.state, "")),
                up,
                str(m.restarts),
                m.last_event,
            )
        return table

    def changed(self, managed: Managed) -> None:
        """Note a process's change of state (called from the supervisor's threads)."""
        with self._lock:
            if managed.state == "died":
                key = (managed.spec.name, managed.started_at)
                if key in self._reported:
                    return
                self._reported.add(key)
                self.console.print(
                    f"[bold red]{managed.spec.name} died with status {managed.exit_code}[/];"
                    f" log {managed.log_path}, stderr {managed.err_path}"
                )
                tail = _tail(managed)
                if tail:
                    self.console.print(Text(tail, style="red"))
            elif self._live is None and managed.state in ("running", "powered off"):
                info = ""
                if managed.state == "running" and managed.restarts:
                    info = f" (restart {managed.restarts})"
                self.console.print(
                    f"  {managed.spec.name:<14} {managed.state}{info}  pid {managed.pid}",
                    style=_STATE_STYLE.get(managed.state, ""),
                )

    def run_until_interrupted(self) -> None:
        """Redraw the table until Ctrl-C (KeyboardInterrupt propagates)."""
        if not self.console.is_terminal:
            self.console.print("running; stop with Ctrl-C or SIGTERM")
            while True:
                time.sleep(3600)
        with Live(
            Group(self.table()),
            console=self.console,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=False,
        ) as live:
            self._live = live
            try:
                while True:
                    live.update(Group(self.table(), Text("Ctrl-C stops everything", "dim")))
                    time.sleep(1 / REFRESH_PER_SECOND)
            finally:
                self._live = None

    def close(self) -> None:
        """Print the final state of every process."""
        if self._app is not None and self._app.supervisor is not None:
            self.console.print(self.table())


def _tail(managed: Managed) -> str:
    from host_tools.launcher import tail

    return tail(managed.err_path)
