"""Checkpoints of a run: the method's state plus a JSON record (step, data-iterator position, RNG).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save (even with kill -9) leaves the previous checkpoints intact and the partial one is ignored.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, record) pairs under `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: os.PathLike, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, record: dict) -> None:
    """Saves asynchronously; `wait()` (or the next save) completes it."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    record=ocp.args.JsonSave(record)))

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the structure (and shardings) of `target`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
    return restored.state, dict(restored.record)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
