"""The one error `cy` reports: a message and a code, printed on stderr without a traceback."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


class CliError(Exception):
    """A failure to report to the user as one line, then exit with `exit_code` (1). `code` is the API's error
    code (`MODEL_NOT_FOUND`, …) or the client's own (`CONNECTION_FAILED`, `CONFIG`, `JOB_FAILED`); `status` is
    the HTTP status, if there was one. `cy`'s `main()` catches it (typer 0.29 vendors click, so there is no
    public ClickException to subclass)."""

    def __init__(self, message: str, *, code: str = "ERROR", status: int | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.exit_code = exit_code

    def show(self) -> None:
        where = f"HTTP {self.status}, " if self.status else ""
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(self.message)} [dim]({where}{escape(self.code)})[/]"
        )
