"""Progress of training runs: bars in a terminal, plain-text lines when the output is a file.

:class:`RunDisplay` follows one or many runs (a comparison's arms x seeds, possibly in
worker processes) through the events the training loop sends
(:func:`~batchlab.recipes._loop.train_loop`'s ``progress=callback``):

* in a terminal (stderr is a TTY): an overall bar in training steps with the time left,
  whose label says which epoch / how many runs are done, and one bar per running job
  for the current epoch's steps;
* when stdout is not a terminal (``make demo > log``, CI): one plain-text line at least
  every ``interval`` seconds (default 10) from a background thread, so a long stage that
  sends no events (data, teacher ranking, evaluation) still shows that the job is alive;
* one line per finished run with its result (:meth:`RunDisplay.finish`).

Events are dicts: ``{"event": "epoch", "epoch": e, "epochs": E, "steps": S}`` when an
epoch starts, ``{"event": "step", "epoch": e, "step": s, "steps": S, "loss": x}`` after
each step, and ``{"event": "stage", "text": ...}`` for work between epochs.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Sequence


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunDisplay:
    """Bars and heartbeat lines for ``tasks`` (names), each expected to take ``steps`` steps.

    ``enabled=False`` shows nothing. ``bars`` / ``lines`` default to: bars when stderr is a
    terminal, heartbeat lines (on stdout) when stdout is not.
    """

    def __init__(self, tasks: Sequence[str], steps: Sequence[int], *, enabled: bool = True, bars: bool | None = None,
                 lines: bool | None = None, interval: float = 10.0, unit: str = "run") -> None:
        self.names, self.unit = list(tasks), unit
        self.expected = [max(1, int(s)) for s in steps]
        self.done_steps = [0] * len(self.names)
        self.state: dict[int, dict[str, Any]] = {}
        self.finished: set[int] = set()
        self.enabled, self.start_time = enabled, time.perf_counter()
        self.bars = enabled and (sys.stderr.isatty() if bars is None else bars)
        self.lines = enabled and (not sys.stdout.isatty() if lines is None else lines)
        self.interval = float(interval)
        self._lock = threading.Lock()
        self._overall = self._slots = None
        self._slot_of: dict[int, int] = {}
        if self.bars:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._overall = tqdm(total=sum(self.expected), desc=self._label(), unit="step", dynamic_ncols=True)
            self._slots = []
        self._note: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if self.lines:
            self._thread = threading.Thread(target=self._heartbeat, name="batchlab-progress", daemon=True)
            self._thread.start()

    # -- what the runs report ---------------------------------------------------------
    def callback(self, i: int) -> Callable[[dict[str, Any]], None]:
        """The ``progress=`` callback of task ``i`` (same process)."""
        return lambda event: self.event(i, event)

    def note(self, text: str | None) -> None:
        """What happens before or between runs (shown while no run reports, e.g. data or teacher work)."""
        with self._lock:
            self._note = text
        if self.bars and text:
            self._overall.set_postfix_str(text)

    def start(self, i: int) -> None:
        with self._lock:
            self.state.setdefault(i, {"text": "starting"})

    def event(self, i: int, event: dict[str, Any]) -> None:
        """Apply one event of task ``i``."""
        with self._lock:
            state = self.state.setdefault(i, {})
            kind = event.get("event")
            if kind == "epoch":
                state.update(epoch=event["epoch"], epochs=event["epochs"], steps=event["steps"], step=0, text=None)
                # re-estimate this task's total from the real epoch length
                self.expected[i] = self.done_steps[i] + event["steps"] * (event["epochs"] - event["epoch"] + 1)
            elif kind == "step":
                advance = max(0, int(event["step"]) - int(state.get("step", 0)))
                state.update(step=event["step"], steps=event["steps"], epoch=event["epoch"], loss=event.get("loss"))
                self.done_steps[i] += advance
            elif kind == "stage":
                state["text"] = event.get("text")
            if self.bars:
                self._draw(i, state)

    def finish(self, i: int, line: str | None = None) -> None:
        """Task ``i`` is done; print ``line`` (its result) above the bars."""
        with self._lock:
            self.finished.add(i)
            self.done_steps[i] = self.expected[i] = max(self.done_steps[i], 1)
            self.state.pop(i, None)
            if self.bars:
                slot = self._slot_of.pop(i, None)
                if slot is not None:
                    self._slots[slot][1] = None
                    self._slots[slot][0].reset()
                    self._slots[slot][0].set_description("idle")
                self._sync_overall()
        if line and self.enabled:
            self.write(f"finished {line}")

    def tick(self) -> None:
        """Refresh the bars (call from the loop that waits on workers)."""
        if self.bars:
            with self._lock:
                self._sync_overall()

    def write(self, line: str) -> None:
        """Print a line without breaking the bars."""
        if self.bars:
            self._tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._overall is not None:
            for bar, _ in self._slots:
                bar.close()
            self._overall.close()
            self._overall = None

    # -- text ---------------------------------------------------------------------------
    def _label(self) -> str:
        if len(self.names) == 1:
            state = next(iter(self.state.values()), {})
            return f"epoch {state.get('epoch', 1)}/{state.get('epochs', '?')}" if state.get("epochs") else self.names[0]
        return f"{self.unit}s {len(self.finished)}/{len(self.names)}"

    def fraction(self) -> float:
        return min(1.0, sum(self.done_steps) / max(1, sum(self.expected)))

    def status(self) -> str:
        """One plain-text line: elapsed time, runs done, what runs now, time left."""
        with self._lock:
            elapsed = time.perf_counter() - self.start_time
            fraction = self.fraction()
            running = []
            for i, s in sorted(self.state.items()):
                if s.get("text"):
                    running.append(f"{self.names[i]} ({s['text']})")
                elif s.get("epochs"):
                    running.append(f"{self.names[i]} (epoch {s['epoch']}/{s['epochs']}, step {s.get('step', 0)}/"
                                   f"{s.get('steps', '?')})")
            left = f"about {_clock(elapsed / fraction * (1 - fraction))} left" if fraction > 0.02 else "estimating time left"
            head = (f"{len(self.finished)}/{len(self.names)} {self.unit}s done, " if len(self.names) > 1 else "")
            return (f"[{_clock(elapsed)}] {head}{100 * fraction:.0f}% of steps; "
                    f"{'running: ' + '; '.join(running) if running else self._note or 'preparing'}; {left}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.status(), flush=True)

    def _sync_overall(self) -> None:
        bar = self._overall
        bar.total = sum(self.expected)
        bar.n = sum(self.done_steps)
        bar.set_description(self._label(), refresh=False)
        bar.refresh()

    def _draw(self, i: int, state: dict[str, Any]) -> None:
        slot = self._slot_of.get(i)
        if slot is None:
            free = [k for k, (_, owner) in enumerate(self._slots) if owner is None]
            if free:
                slot = free[0]
            else:
                bar = self._tqdm(total=1, position=len(self._slots) + 1, leave=False, unit="step", dynamic_ncols=True)
                self._slots.append([bar, None])
                slot = len(self._slots) - 1
            self._slots[slot][1] = i
            self._slot_of[i] = slot
        bar = self._slots[slot][0]
        if state.get("steps") and bar.total != state["steps"]:
            bar.reset(total=state["steps"])
        text = state.get("text") or (f"epoch {state.get('epoch')}/{state.get('epochs')}" if state.get("epochs") else "")
        bar.set_description(f"{self.names[i]} {text}".strip(), refresh=False)
        bar.n = int(state.get("step", 0))
        if state.get("loss") is not None:
            bar.set_postfix(loss=f"{state['loss']:.3f}", refresh=False)
        bar.refresh()
        self._sync_overall()


class QueueCallback:
    """A ``progress=`` callback for a worker process: puts ``(task, event)`` on a queue.

    Step events are sent at most every ``every`` seconds (the last step of an epoch
    always), so a fast loop does not flood the queue.
    """

    def __init__(self, queue, task: int, every: float = 0.5) -> None:
        self.queue, self.task, self.every, self._last = queue, task, every, 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "step" and event.get("step") != event.get("steps"):
            now = time.perf_counter()
            if now - self._last < self.every:
                return
            self._last = now
        self.queue.put((self.task, event))


def arithmetic() -> dict[str, Any]:
    """The settings that decide CPU floating-point results (recorded with every comparison).

    Bitwise-equal results need the same library versions, torch threads, ATen CPU
    kernels (``ATEN_CPU_CAPABILITY``) and MKL code path (``MKL_CBWR``); see
    :func:`pin_cpu_arithmetic`.
    """
    import os

    import torch

    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
    }


#: Environment that makes torch's CPU arithmetic the same on any x86-64 machine with AVX2
#: (AMD or Intel, with or without AVX-512): ATen's vectorised kernels and MKL's code path
#: are pinned to AVX2. Must be set before torch is imported (``batchlab demo`` does).
REPRODUCIBLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pin_cpu_arithmetic() -> bool:
    """Set :data:`REPRODUCIBLE_CPU_ENV` unless the user set those variables; True when it takes effect
    (torch not imported yet). Worker processes started afterwards inherit it."""
    import os
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    for key, value in REPRODUCIBLE_CPU_ENV.items():
        os.environ.setdefault(key, value)
    return "torch" not in sys.modules
