"""Run logging (spec 8): config.json, metrics.jsonl, logs.log, TensorBoard events, metrics.png, optional W&B.

    ml_logger = setup_logging(log_path, config=config)
    ml_logger.log_metrics({"train_mean_nll": 1.9}, step=0)
    ml_logger.close()

Resume: records of metrics.jsonl with step >= `start_step` are dropped (one atomic rewrite) before anything
new is appended. With `start_step=None` this happens at the first `log_metrics` call, using its step, so a
resumed run that re-logs from step s never leaves a gap or a duplicate.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from rlhfkit.config import environment
from rlhfkit.run_files import (
    CODE_DIFF_FILE,
    ENVIRONMENT_FILE,
    LOG_FILE,
    METRICS_FILE,
    METRICS_PLOT,
    STAGE_CONFIG_FILE,
)
from rlhfkit.utils.atomic import append_jsonl, read_jsonl, rewrite_jsonl_atomic, write_json_atomic, write_text_atomic
from rlhfkit.utils.plots import plot_metrics

logger = logging.getLogger(__name__)
METRICS_LOGGER_NAME = "rlhfkit.metrics"  # per-step tables: logs.log only, not the console
PLOT_EVERY_SECONDS = 30.0


def dump_config(obj: Any) -> Any:
    """A JSON-able view of a config: dataclasses expanded (nested ones tagged with their class), callables as
    "module.name", enums by value, other objects as their type name."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): dump_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [dump_config(v) for v in obj]
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _dump_with_types(obj: Any) -> Any:
    """dump_config, but nested dataclasses (e.g. dataset builders) also record their class."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _dump_with_types(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}
    if isinstance(obj, (list, tuple)):
        return [_dump_with_types(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _dump_with_types(v) for k, v in obj.items()}
    return dump_config(obj)


def dump_run_config(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: _dump_with_types(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return _dump_with_types(config)


class _TqdmConsoleHandler(logging.StreamHandler):
    """Console output that does not break tqdm progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def _format_table(metrics: dict, step: int) -> str:
    rows = [(k, v) for k, v in metrics.items() if not (k.endswith(":total") or k.endswith(":count"))]
    width = max((len(k) for k, _ in rows), default=4)
    lines = [f"step {step}"] + [
        f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows
    ]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _write_code_diff(log_dir: Path) -> None:
    """`code.diff`: the package's git HEAD and uncommitted changes, if it lives in a git repository."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return
    if head.returncode == 0:
        write_text_atomic(log_dir / CODE_DIFF_FILE, f"### repo: {root} @ {head.stdout.strip()}\n{diff.stdout}")


class MetricsLogger:
    def __init__(
        self, log_dir: Path, start_step: int | None, plot_panels: Sequence[Sequence[str]] | None, wandb_run: Any = None
    ):
        self.log_dir = log_dir
        self.metrics_path = log_dir / METRICS_FILE
        self.plot_path = log_dir / METRICS_PLOT
        self.plot_panels = plot_panels
        self._wandb = wandb_run
        self._tensorboard: Any = None
        self._last_plot = 0.0
        self._truncated = False
        self._purge_step = 0
        self.records = read_jsonl(self.metrics_path)
        if start_step is not None:
            self._drop_from(start_step)

    def _drop_from(self, step: int) -> None:
        kept = [r for r in self.records if r.get("step", -1) < step]
        if self.metrics_path.exists():
            rewrite_jsonl_atomic(self.metrics_path, kept)  # also removes a torn last line
        self.records = kept
        self._truncated = True
        self._purge_step = step

    def _tensorboard_writer(self) -> Any:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self._purge_step if self._purge_step > 0 else None
            self._tensorboard = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        return self._tensorboard

    def log_hparams(self, config: Any) -> None:
        write_json_atomic(self.log_dir / STAGE_CONFIG_FILE, dump_run_config(config))
        write_json_atomic(self.log_dir / ENVIRONMENT_FILE, environment())  # what else changes the engine
        if self._wandb is not None:
            self._wandb.config.update(dump_run_config(config), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self._truncated:
            self._drop_from(step)
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        append_jsonl(self.metrics_path, record)
        self.records.append(record)
        logging.getLogger(METRICS_LOGGER_NAME).info(_format_table(record, step))
        writer = self._tensorboard_writer()
        for key, value in record.items():
            if (
                key != "step"
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                writer.add_scalar(key, value, global_step=step)
        writer.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if time.monotonic() - self._last_plot >= PLOT_EVERY_SECONDS:
            self.plot()

    def plot(self) -> None:
        try:
            plot_metrics(self.records, self.plot_path, self.plot_panels, title=self.log_dir.name)
        except Exception as e:  # a plot must never stop training
            logger.warning("could not write %s: %s", self.plot_path, e)
        self._last_plot = time.monotonic()

    def close(self) -> None:
        self.plot()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        for handler in _installed_handlers.pop(str(self.log_dir), []):
            logging.getLogger().removeHandler(handler)
            handler.close()


_installed_handlers: dict[str, list[logging.Handler]] = {}


def _configure_logging_module(log_dir: Path) -> None:
    """Root logger at INFO: logs.log gets everything, the console everything but the per-step tables."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handlers in _installed_handlers.values():  # a new run in the same process replaces the old handlers
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    _installed_handlers.clear()
    file_handler = logging.FileHandler(log_dir / LOG_FILE, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _TqdmConsoleHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(lambda record: record.name != METRICS_LOGGER_NAME)
    for handler in (file_handler, console):
        root.addHandler(handler)
    _installed_handlers[str(log_dir)] = [file_handler, console]


def setup_logging(
    log_dir: str | os.PathLike,
    wandb_project: str | None = None,
    wandb_name: str | None = None,
    config: Any = None,
    do_configure_logging_module: bool = True,
    start_step: int | None = None,
    plot_panels: Sequence[Sequence[str]] | None = None,
) -> MetricsLogger:
    """Create `log_dir` and a MetricsLogger writing there (see the module docstring).
    `plot_panels`: groups of metric keys, one plot panel each (default: plots.DEFAULT_PANELS)."""
    log_dir = Path(log_dir).expanduser().resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    if do_configure_logging_module:
        _configure_logging_module(log_dir)
    wandb_run = None
    if wandb_project is not None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "wandb_project is set but wandb is not installed: pip install wandb "
                "(set WANDB_MODE=offline to log without a network)"
            ) from e
        wandb_run = wandb.init(
            project=wandb_project,
            name=wandb_name,
            dir=str(log_dir),
            config=dump_run_config(config) if config is not None else None,
        )
    ml_logger = MetricsLogger(log_dir, start_step, plot_panels, wandb_run)
    if config is not None:
        ml_logger.log_hparams(config)
    _write_code_diff(log_dir)
    logger.info("logging to %s", log_dir)
    return ml_logger
