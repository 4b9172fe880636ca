"""Preemption: TPU pods and clusters send SIGTERM before taking machines away.

One process: while `StopSignals` is entered, SIGTERM and SIGINT only set a flag, which the
training loop reads between steps. Several processes (a pod, a cluster): JAX's preemption service
(on by default with jax.distributed) catches SIGTERM on any host and, through the coordination
service, picks one step at which every process stops (`should_stop`, orbax's
CheckpointManager.reached_preemption): no per-step collective, so the hosts keep dispatching ahead
of the devices. Either way the loop checkpoints that step and raises `Preempted`, so that rerunning
the same command resumes.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preempted(SystemExit):
  """Raised by run() after SIGTERM or SIGINT, once the step in flight is checkpointed.

  A SystemExit, so the command ends without a traceback and with 128 + the signal number (143 for
  SIGTERM, 130 for SIGINT), the status a shell reports for a process the signal killed: schedulers
  and job controllers (Kubernetes Jobs, SLURM, retry loops in launch scripts) see a run that did not
  finish and start it again, which resumes it. Exit 0 would read as "done" and the run would never
  resume. In-process callers (a notebook) can catch it by name.
  """

  def __init__(self, step: int, signal_number: int):
    super().__init__(128 + signal_number)
    self.step = step


class StopSignals:
  """While entered, SIGTERM and SIGINT only set `received`; the loop reads it between steps.

  The handler does nothing else: saving from inside it could interrupt the loop mid-step.
  Python lets only the main thread install handlers; elsewhere (a thread of a notebook server)
  the signals keep their previous meaning.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    # With several processes JAX's preemption service owns SIGTERM (a handler of ours would
    # replace its own), and a Ctrl-C stays an immediate KeyboardInterrupt.
    self.signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signal_number in self.signals:
        self._previous[signal_number] = signal.signal(signal_number, self._handle)
    return self

  def _handle(self, signal_number, frame):
    if self.received is not None and signal_number == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: the user will not wait for the checkpoint.
    self.received = signal_number

  def __exit__(self, *exc_info):
    for signal_number, previous in self._previous.items():
      # None: a handler installed outside Python, which Python cannot reinstall.
      signal.signal(signal_number, signal.SIG_DFL if previous is None else previous)
    return False


def should_stop(manager, step: int, stop_signals: StopSignals) -> bool:
  """True once the run must checkpoint `step` and stop, the same step on every process.

  The checkpoint save is collective: a process that saved and left alone would leave the others
  waiting in the next step's collectives. One process decides alone from its signal flag; several
  ask the preemption sync point (`manager`: orbax's CheckpointManager), which every process must
  ask at every step.
  """
  if jax.process_count() == 1:
    return stop_signals.received is not None
  return manager.reached_preemption(step)
