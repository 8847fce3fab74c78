"""Checkpoints of a run: the method's state plus a JSON record (step, data-iterator position, RNG).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save (even with kill -9) leaves the previous checkpoints intact and the partial one is ignored.

Faults become one-line `DataError`s, never orbax tracebacks: a save that fails in orbax's background
thread (a full disk) is reported by `check()` right after the next step, and `restore_latest` falls
back to an older checkpoint when the newest cannot be read (a truncated or deleted file).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxseg.data.base import DataError

# Files of a step folder whose loss orbax reports obscurely ("pytree structure error", a JSON
# decode error): named in the reason instead.
_KEY_FILES = ("state/_METADATA", "state/manifest.ocdbt", "record/metadata")


class _QuietOrbaxErrors(logging.Filter):
  """Drops orbax's own error logs (with tracebacks, from its background threads): every error they
  describe reaches the `Checkpointer`, which reports it as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


class _QuietAbandonedWrites(logging.Filter):
  """Drops asyncio's "exception was never retrieved" of the writes orbax abandons after a failed
  save (jaxseg runs no event loop of its own); the failure itself is reported by `Checkpointer`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


logging.getLogger("absl").addFilter(_QuietOrbaxErrors())
logging.getLogger("asyncio").addFilter(_QuietAbandonedWrites())


def _orbax_leftover(unraisable) -> bool:
  """An "exception ignored" of a write orbax abandoned after a failure that the `Checkpointer`
  reports: a tensorstore callback into orbax's closed event loop, or an orbax coroutine collected
  at interpreter exit."""
  error, obj = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _install_unraisable_filter() -> None:
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_leftover(unraisable):
      previous(unraisable)
  sys.unraisablehook = hook


_install_unraisable_filter()


def reason(error: BaseException) -> str:
  """A short cause of `error`: the OS error at its root if any ("No space left on device"), else
  the first line of its innermost cause, at most 200 characters (tensorstore appends whole
  specs)."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
    found = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's OS errors.
    if found:
      return os.strerror(int(found.group(1)))
  lines = str(chain[-1]).strip().splitlines()
  text = lines[0] if lines else type(chain[-1]).__name__
  # The caller names the folder.
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  return text if len(text) <= 200 else text[:197] + "..."


def _remove_partial(directory: pathlib.Path, step: int, patience_s: float = 5.0) -> None:
  """Removes orbax's temporary folder(s) of the failed save of `step`. orbax reports the first
  failed write while its other writer threads may still be creating files in that folder, so one
  rmtree can lose the race ("Directory not empty"): retry until it is gone or `patience_s` passed."""
  deadline = time.monotonic() + patience_s
  while True:
    partials = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    for partial in partials:
      shutil.rmtree(partial, ignore_errors=True)
    if not any(p.exists() for p in partials) or time.monotonic() > deadline:
      return
    time.sleep(0.05)


class Checkpointer:
  """Saves and restores (state, record) pairs under `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: os.PathLike, max_to_keep: int = 2, create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self._saving: Optional[int] = None  # The step of the save in flight or not yet checked.
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))
    except OSError as e:
      raise DataError(f"checkpoint folder {self.directory} cannot be used ({reason(e)})") from None

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, record: dict) -> None:
    """Saves asynchronously; `check()`, `wait()` or the next save reports a failure."""
    self.wait()  # orbax waits for the previous save here anyway: report its failure as its own.
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      record=ocp.args.JsonSave(record)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None
    self._saving = step

  def check(self) -> None:
    """Raises a `DataError` if the last save has failed in the background; never waits for a save
    in progress, so it costs nothing to call after every training step."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; a `DataError` naming its step if it failed."""
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None

  def _save_error(self, step: Optional[int], error: BaseException) -> DataError:
    good = [s for s in self.manager.all_steps() if s != step]
    kept = (f"the last good checkpoint is {self.step_dir(max(good))}" if good
            else "no checkpoint was kept")
    where = self.step_dir(step) if step is not None else self.directory
    if step is not None and jax.process_index() == 0:
      # orbax's partial folder of the failed save: never read, and on a full disk it holds the
      # space the logs need to close.
      _remove_partial(self.directory, step)
    return DataError(f"checkpoint {where} could not be saved ({reason(error)}); training stopped, "
                     f"{kept}")

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the structure (and shardings) of `target`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
    return restored.state, dict(restored.record)

  def unreadable_reason(self, step: int, error: BaseException) -> str:
    """Why checkpoint `step` could not be read: a missing or empty key file if any, else `error`."""
    for name in _KEY_FILES:
      path = self.step_dir(step) / name
      if not path.exists():
        return f"{name} is missing"
      if path.is_file() and path.stat().st_size == 0:
        return f"{name} is empty"
    return reason(error)

  def restore_latest(self, target: Any) -> tuple[Any, Optional[dict], list[tuple[int, str]]]:
    """The newest checkpoint that can be read: (state, record, [(newer step, why unreadable)]).

    (target, None, []) if there is none at all; a `DataError` if there are checkpoints but none can
    be read. Unreadable ones are left in place (see `set_aside`).
    """
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, record = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        unreadable.append((step, self.unreadable_reason(step, e)))
        continue
      return state, record, unreadable
    if unreadable:
      raise DataError(f"no checkpoint in {self.directory} can be read: " + "; ".join(
          f"{step} ({why})" for step, why in unreadable))
    return target, None, []

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves the (unreadable) checkpoint `step` out of the checkpoint folder, to
    `<workdir>/unreadable_checkpoints/<step>`: training after a fallback saves that step again, and
    orbax would refuse to overwrite it or count it among the kept checkpoints. Never deleted."""
    aside = self.directory.parent / "unreadable_checkpoints"
    aside.mkdir(exist_ok=True)
    dest, n = aside / str(step), 1
    while dest.exists():
      n += 1
      dest = aside / f"{step}.{n}"
    shutil.move(str(self.step_dir(step)), str(dest))
    return dest

  def reload(self) -> None:
    """Re-reads the step folders (after `set_aside`)."""
    self.manager.reload()

  def close(self, quiet: bool = False) -> None:
    """Waits for the save in flight and closes; `quiet` (when already failing) ignores its error."""
    try:
      self.wait()
    except DataError:
      if not quiet:
        raise
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not quiet:
          raise
