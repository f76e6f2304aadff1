"""mmengine checkpoints read as data and written atomically; resuming keeps the optimizer's moments.

Registering into mmengine (``import adan_plugin`` or ``custom_imports``) installs

* a loader for local checkpoint files (mmengine's ``CheckpointLoader`` scheme ``''``):
  ``torch.load(weights_only=True)`` with exactly the objects mmengine's own checkpoints
  hold allow-listed (:mod:`.mmengine_safe_globals`), so stock tools such as mmpretrain's
  ``tools/train.py --resume`` work on torch >= 2.6 and a checkpoint can never run code;
  errors name the file and the reason;
* an atomic save for local paths (temporary file beside the target, then ``os.replace``):
  the checkpoint mmengine's ``Runner.save_checkpoint`` writes is complete or absent, and
  a failed save leaves no partial file;

and :class:`ResumeOptimizerStateHook` (added by tools/train_mm.py) refuses to resume from a
checkpoint without optimizer state, which mmengine would silently accept, restarting the
moments from zero, and names the file when its optimizer state does not load.
"""
from __future__ import annotations

import os

from mmengine.hooks import Hook
from mmengine.runner import checkpoint as mm_checkpoint
from mmengine.runner import runner as mm_runner

from ..checkpoint import CheckpointError, load_checkpoint, missing_optimizer_state, save_checkpoint

_mmengine_save_checkpoint = mm_checkpoint.save_checkpoint


def load_local_checkpoint(filename: str, map_location=None):
    """mmengine's loader for local paths, reading data only (weights_only=True)."""
    from mmengine.logging import HistoryBuffer

    # here, not at the top: importing mmengine_safe_globals first is what registers this module
    from .mmengine_safe_globals import mmengine_checkpoint_globals

    HistoryBuffer()  # registers the statistics methods its pickles refer to
    return load_checkpoint(os.path.expanduser(filename), map_location=map_location,
                           safe_globals=mmengine_checkpoint_globals())


def atomic_save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None) -> None:
    """mmengine's ``save_checkpoint``; local files are written to a temporary file and renamed."""
    filename = os.fspath(filename)
    if file_client_args is not None or backend_args is not None or "://" in filename:
        _mmengine_save_checkpoint(checkpoint, filename, file_client_args=file_client_args,
                                  backend_args=backend_args)
        return
    os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
    save_checkpoint(checkpoint, filename)


def register_checkpoint_io() -> None:
    mm_checkpoint.CheckpointLoader.register_scheme(prefixes="", loader=load_local_checkpoint, force=True)
    # Runner.save_checkpoint calls the name imported into mmengine.runner.runner
    mm_runner.save_checkpoint = atomic_save_checkpoint


class ResumeOptimizerStateHook(Hook):
    """Refuses to resume from a checkpoint that has no optimizer state.

    mmengine's ``Runner.resume`` loads the optimizer only when the checkpoint has one,
    so resuming from a weights-only file restarts Adan's moments from zero without a
    word.  ``allow_fresh=True`` (tools/train_mm.py ``--allow-fresh-optimizer-state``)
    accepts it with a warning.  ``load_from`` without ``resume`` (fine-tuning) is not
    concerned.  An optimizer state the optimizer refuses (another optimizer's,
    invalid hyper-parameters) raises :class:`CheckpointError` naming the file,
    like every other unusable checkpoint, rather than the optimizer's bare error.
    """

    priority = "VERY_HIGH"

    def __init__(self, allow_fresh: bool = False):
        self.allow_fresh = bool(allow_fresh)

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        if not getattr(runner, "_resume", False) or runner.optim_wrapper is None:
            return
        source = runner._load_from or f"the latest checkpoint in {runner.work_dir}"
        problem = missing_optimizer_state(checkpoint)
        if problem is None:
            _name_the_file_on_failure(runner.optim_wrapper, source)
            return
        if not self.allow_fresh:
            raise CheckpointError(f"resume from {source!r}: {problem}; resuming would restart the optimizer's "
                             f"moments from zero (tools/train_mm.py --allow-fresh-optimizer-state, or "
                             f"ResumeOptimizerStateHook(allow_fresh=True), to do that on purpose)")
        runner.logger.warning(f"resume from {source!r}: {problem}; the optimizer's moments start from zero")


def _name_the_file_on_failure(optim_wrapper, source: str) -> None:
    """Make the optimizer-state load ``Runner.resume`` does next raise ``CheckpointError`` naming ``source``.

    This hook runs inside ``Runner.load_checkpoint``, just before the load; the
    wrapper's own ``load_state_dict`` is back in place once it has run.
    """
    from mmengine.optim import OptimWrapper, OptimWrapperDict

    if not isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict)):  # a config not built yet: resume builds it
        return
    load_state_dict = optim_wrapper.load_state_dict

    def load_naming_the_file(state_dict):
        del optim_wrapper.load_state_dict
        try:
            return load_state_dict(state_dict)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"resume from {source!r}: its optimizer state does not load: {err}") from None

    optim_wrapper.load_state_dict = load_naming_the_file
