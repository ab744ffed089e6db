"""What a build shows on the terminal and what it keeps in its log file.

The terminal gets one progress bar per stage (its line stays: the stage's time and peak memory,
or "up to date"), the build plan's own lines and every warning once; the log file beside the
folder (`engines/<folder>.build.log`, appended per build) gets everything: our INFO lines and
whatever the exporters and quantizers write while a stage runs (torch.onnx's notices, ModelOpt's
and ONNX Runtime's logging, prints and progress bars, C-level output on fd 1 and 2). A message
said again (the same torch warning once per exported graph) is dropped from the terminal, and
the build ends with one `(repeated N times)` line per such message.

`BuildLog` is the context of one build; `stage_bar` and `progress` are what stage code calls
(both do nothing outside a build, or with progress off).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

# loggers whose INFO lines the terminal shows (the rest go to the log file only)
TERMINAL_INFO = ("export.build_plan",)
# our own packages: their warnings are ours to show; other libraries' go to the log file only
OURS = ("export", "training", "runtime", "build_engines", "py.warnings")
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} {unit} [{elapsed}]{postfix}"
_active: BuildLog | None = None


def log_path(folder: Path) -> Path:
    """The build log of an engine folder: beside it, so the folder holds only what it lists."""
    return folder.parent / f"{folder.name}.build.log"


class TerminalFilter(logging.Filter):
    """On the terminal: WARNING and above from our packages and Python warnings, INFO from the
    build plan (everything with `verbose`), each message once; other libraries' records below
    ERROR are left to the log file. Counts what it drops as repeats."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose
        self.seen: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith(OURS)
        if record.levelno < logging.ERROR and not ours and not self.verbose:
            return False
        if record.levelno < logging.WARNING and not (
            self.verbose or record.name.startswith(TERMINAL_INFO)
        ):
            return False
        key = record.getMessage()
        self.seen[key] += 1
        return self.seen[key] == 1

    def repeats(self) -> list[str]:
        """One line per message dropped as a repeat: `(repeated N times) <its first line>`."""
        lines = []
        for message, n in self.seen.items():
            if n > 1:
                first = message.strip().splitlines()[0] if message.strip() else message
                short = first if len(first) <= 100 else first[:97] + "..."
                lines.append(f"(repeated {n} times) {short}")
        return lines


class BuildLog:
    """One build's output: its log file, the terminal's stage bars, third-party output captured.

    `terminal_handlers`: the logging handlers that write to the terminal (the CLI's); they get
    the `TerminalFilter` for the build and keep writing to the terminal while a stage's output
    is captured. Without any, warnings reach Python's last-resort handler (stderr, captured
    during a stage like everything else).
    """

    def __init__(self, path: Path, *, progress: bool = True, verbose: bool = False) -> None:
        self.path = Path(path)
        self.progress = progress
        self.filter = TerminalFilter(verbose)
        self._stack = contextlib.ExitStack()
        self.terminal = sys.stderr
        self.bar: tqdm | None = None
        self._stream: io.TextIOBase | None = None

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> BuildLog:
        global _active
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stack = self._stack
        self.terminal = stack.enter_context(_terminal_stream())
        file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(file)
        root.setLevel(min(old_level or logging.WARNING, logging.INFO))
        stack.callback(root.setLevel, old_level)
        stack.callback(root.removeHandler, file)
        stack.callback(file.close)
        given = [f for h in root.handlers for f in h.filters if isinstance(f, TerminalFilter)]
        self.filter = given[0] if given else self.filter  # the CLI's: it says each one once
        for handler in _terminal_handlers(root):
            old_stream = handler.stream
            handler.setStream(_AroundBars(self.terminal))
            stack.callback(handler.setStream, old_stream)
            if not given:
                handler.addFilter(self.filter)
                stack.callback(handler.removeFilter, self.filter)
        before = warnings.showwarning
        logging.captureWarnings(True)  # warnings through logging: the filter says each once
        if warnings.showwarning is not before:
            stack.callback(logging.captureWarnings, False)
        stack.callback(self._close_python_stream)
        header = f"==== build {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(header + "\n")
        _active = self
        stack.callback(_deactivate)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.bar is not None:
                self.bar.close()
            for line in self.filter.repeats():
                print(line, file=self.terminal)
        finally:
            self._stack.close()

    # ------------------------------------------------------------------ stages
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """A stage's bar (one line that stays) and its third-party output sent to the log file.
        The yielded dict's `postfix` is shown at the end of the line."""
        info: dict = {}
        self.bar = tqdm(
            total=1, desc=f"{name:<22}", unit="stage", file=self.terminal,
            disable=not self.progress, bar_format=BAR_FORMAT, dynamic_ncols=True,
            mininterval=0.5 if _isatty(self.terminal) else 30.0,
        )  # fmt: skip
        try:
            with self.capture():
                yield info
            self.bar.n = self.bar.total
        finally:
            self.bar.set_postfix_str(info.get("postfix", ""), refresh=False)
            self.bar.close()
            self.bar = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Everything written to stdout and stderr in the block (file descriptors 1 and 2, and
        Python's streams where they are not those: a test's capture objects) goes to the log
        file; the terminal stream and the handlers writing to it are not moved."""
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        saved = {}
        try:
            for target in (1, 2):
                with contextlib.suppress(OSError):
                    copy = os.dup(target)
                    os.dup2(fd, target)
                    saved[target] = copy
            with contextlib.ExitStack() as stack:
                for name, target in (("stdout", 1), ("stderr", 2)):
                    if not _writes_to(getattr(sys, name), target):
                        stack.enter_context(_swapped(name, self._python_stream()))
                yield
        finally:
            for s in (sys.stdout, sys.stderr):
                _flush(s)
            for target, copy in saved.items():
                os.dup2(copy, target)
                os.close(copy)
            os.close(fd)

    def _python_stream(self) -> io.TextIOBase:
        """The log file as a Python stream, for `sys.stdout`/`sys.stderr` objects that do not
        write to fd 1/2; kept for the build (handlers made meanwhile hold it), then closed."""
        if self._stream is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            raw = os.fdopen(fd, "wb")
            self._stream = io.TextIOWrapper(
                raw, encoding="utf-8", errors="backslashreplace", line_buffering=True
            )
        return self._stream

    def _close_python_stream(self) -> None:
        if self._stream is not None:
            _repoint_handlers(self._stream, sys.stderr)  # e.g. ModelOpt's console handler
            self._stream.close()
            self._stream = None


def _deactivate() -> None:
    global _active
    _active = None


def active() -> BuildLog | None:
    return _active


def progress(total: int, unit: str, what: str) -> ProgressBar:
    """Re-aim the running stage's bar at `total` units of `what` (calibration calls, quantizer
    samples); returns it to `update(n)` and `note(text)`. A no-op outside a build."""
    bar = _active.bar if _active is not None else None
    return ProgressBar(None if bar is None or bar.disable else bar, total, unit, what)


class ProgressBar:
    def __init__(self, bar: tqdm | None, total: int, unit: str, what: str) -> None:
        self.bar = bar
        if bar is not None:
            bar.refresh()  # the previous phase's last state, where refreshes are rare
            name = bar.desc.split(" (", 1)[0].rstrip()
            bar.unit = unit
            bar.set_description_str(f"{name} ({what})".ljust(22), refresh=False)
            bar.set_postfix_str("", refresh=False)
            bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def advance(self, done: int, total: int, note: str = "") -> None:
        """`done` of `total` units so far; `note` says where (shown after the bar)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(done - self.bar.n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)


def _terminal_handlers(root: logging.Logger) -> list[logging.StreamHandler]:
    terminal = (sys.stderr, sys.__stderr__, sys.stdout, sys.__stdout__)
    return [
        h
        for h in root.handlers
        if type(h) is logging.StreamHandler and any(h.stream is s for s in terminal)
    ]


@contextlib.contextmanager
def _terminal_stream() -> Iterator[io.TextIOBase]:
    """A stream to the terminal that redirecting fd 2 does not move: a duplicate of fd 2 when
    `sys.stderr` writes to it, else `sys.stderr` itself (a test's capture object)."""
    if not _writes_to(sys.stderr, 2):
        yield sys.stderr
        return
    _flush(sys.stderr)
    stream = io.TextIOWrapper(
        os.fdopen(os.dup(2), "wb"), encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace", line_buffering=True,
    )  # fmt: skip
    try:
        yield stream
    finally:
        stream.close()


class _AroundBars:
    """The terminal for log lines: a running bar is cleared before a line and redrawn after
    it, so a warning never lands in the middle of a bar's line."""

    def __init__(self, terminal) -> None:
        self.terminal = terminal

    def write(self, text: str) -> int:
        with tqdm.external_write_mode(file=self.terminal):
            n = self.terminal.write(text)
            self.terminal.flush()
        return n

    def flush(self) -> None:
        _flush(self.terminal)


@contextlib.contextmanager
def _swapped(name: str, stream) -> Iterator[None]:
    old = getattr(sys, name)
    setattr(sys, name, stream)
    try:
        yield
    finally:
        setattr(sys, name, old)


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _repoint_handlers(old, new) -> None:
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    for logger in loggers:
        for h in getattr(logger, "handlers", ()):
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(new)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _flush(stream) -> None:
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stream.flush()
