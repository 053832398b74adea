"""A run's loggers (the recipe's ``log_to``), opened once per command in the main process, every
call fanned out to each of them.

A logger that cannot start is an error before any work (naming it, its plugin and the recipe
path). A logger that raises while logging is reported once and logs nothing more in that command:
a tracker's trouble (its server out of reach) never stops training, and the run directory holds
every number anyway."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cdmbench.errors import CdmbenchError, Stopped
from cdmbench.plugins import Plugins
from cdmbench.recipe.components import make_component
from cdmbench.recipe.schema import Recipe
from cdmbench.runtime import distributed


class Loggers:
    """Open loggers by name; each method calls every one of them (``interfaces.Logger``). A
    context manager that closes them."""

    def __init__(self, loggers: dict[str, Any] | None = None, *, echo: Callable[[str], Any] = print):
        self.loggers = dict(loggers or {})
        self.echo = echo

    def _call(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args)
            except Stopped:  # SIGINT / SIGTERM: the command stops
                raise
            except Exception as exc:
                del self.loggers[name]
                self.echo(f"logger {name} failed in {method} ({type(exc).__name__}: {exc}); it logs nothing "
                          "more in this command (the run directory has every number)")
                if method != "close":
                    try:
                        logger.close()
                    except Exception:  # its failure is reported above
                        pass

    def start_stage(self, stage: str, step: int) -> None:
        """Stage ``stage`` trains from step ``step`` (its checkpoint's, 0 from scratch)."""
        self._call("start_stage", stage, step)

    def log_scalars(self, stage: str, values: dict[str, float], step: int) -> None:
        """A training log row of ``stage`` (without its step) at step ``step``."""
        self._call("log_scalars", stage, values, step)

    def log_results(self, rows: list[dict[str, Any]], steps: dict[str, int]) -> None:
        """Result rows of any stages, as results.jsonl got them, each stage's at its weights' step
        in ``steps``."""
        by_stage: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_stage.setdefault(row["stage"], []).append(row)
        for stage, stage_rows in by_stage.items():
            self._call("log_results", stage, stage_rows, steps[stage])

    def log_image(self, stage: str, name: str, path: Path, step: int) -> None:
        """An image file of ``stage`` (``samples``: its grid) from the weights of step ``step``."""
        self._call("log_image", stage, name, Path(path), step)

    def close(self) -> None:
        """Close every logger (once)."""
        self._call("close")
        self.loggers.clear()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def open_loggers(plugins: Plugins, recipe: Recipe, run_dir: Path, *, resuming: bool,
                 echo: Callable[[str], Any] = print) -> Loggers:
    """The recipe's loggers for a command on ``run_dir``, built with the host facts (the run
    directory, the run's name, the resolved recipe as config, ``resuming``); in the main process
    only: the other processes of a torchrun job get none."""
    loggers = Loggers(echo=echo)
    if not distributed.is_main():
        return loggers
    for i, spec in enumerate(recipe.log_to):
        path = f"log_to[{i}]"
        try:
            loggers.loggers[spec.name] = make_component(plugins, "loggers", spec, path, run_dir=Path(run_dir),
                                                        run_name=recipe.name, config=recipe.to_dict(),
                                                        resuming=resuming)
        except Exception as exc:
            loggers.close()
            if isinstance(exc, CdmbenchError):
                raise
            plugin = plugins["loggers"].get(spec.name).plugin
            raise CdmbenchError(f"{path}: logger '{spec.name}' (plugin '{plugin}') could not start "
                                f"({type(exc).__name__}: {exc}); fix its args or set-up as that says, or remove it "
                                "from log_to") from exc
    return loggers


def log_run_results(plugins: Plugins, recipe: Recipe, run_dir: Path, rows: list[dict[str, Any]],
                    steps: dict[str, int], *, echo: Callable[[str], Any] = print) -> None:
    """Log result rows of a trained run (``cdmbench evaluate``, ``sweep``) to the recipe's
    loggers, continuing their tracker runs: opened, fed ``rows``, closed."""
    if recipe.log_to and rows:
        with open_loggers(plugins, recipe, run_dir, resuming=True, echo=echo) as loggers:
            loggers.log_results(rows, steps)
