"""Fit isolation forests in a short-lived child process, so the caller never imports
scikit-learn (about 118 MB of RSS with SciPy, for the life of the process).

Parent: fit_in_child(). Child: `python -m driftwarden.models.forest_child`, which reads one
msgpack request on stdin (the jobs: input matrices as bytes, seeds, parameters), fits each with
`Forest.fit` and writes one msgpack answer on stdout (each job's `Forest.to_wire()` or its
error), then exits. Plain data both ways, never pickle. The child runs at a lower priority: a
fit is background work and the agent's own threads come first.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from driftwarden.core.errors import ForestFitError, ModelStateError
from driftwarden.models.forest import Forest

log = logging.getLogger(__name__)

FIT_TIMEOUT = 300.0  # seconds for one child; a 100-tree fit takes ~0.13 s, the imports ~1 s
CHILD_NICENESS = 10
CANCEL_CHECK_SECONDS = 0.2
ERROR_SHOWN = 4000  # characters of the child's stderr kept in the error


@dataclass(frozen=True, eq=False)
class FitJob:
    """One forest to fit: `inputs` is WindowModel.inputs() of the training windows."""

    inputs: np.ndarray
    seed: int = 7
    n_estimators: int = 100
    contamination: float | str = "auto"


def fit_in_child(jobs: Sequence[FitJob], *, timeout: float = FIT_TIMEOUT,
                 cancelled: threading.Event | None = None) -> list[Forest | ForestFitError]:
    """Each job's forest, in order, or the error that job met. Raises ForestFitError when the
    child itself fails (it could not start, crashed, timed out or answered nonsense), or when
    `cancelled` is set while it runs (the child is killed)."""
    if not jobs:
        return []
    request = msgpack.packb({"jobs": [
        {"inputs": np.ascontiguousarray(job.inputs, dtype="<f8").tobytes(),
         "shape": list(job.inputs.shape), "seed": job.seed, "n_estimators": job.n_estimators,
         "contamination": job.contamination} for job in jobs]})
    try:
        child = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise ForestFitError(f"cannot start the forest-fitting child: {e}") from e
    deadline = time.monotonic() + timeout
    with child:
        unsent: bytes | None = request  # communicate() takes the input on its first call only
        while True:
            try:
                stdout, stderr = child.communicate(unsent, timeout=CANCEL_CHECK_SECONDS)
                break
            except subprocess.TimeoutExpired:
                unsent = None
                if cancelled is not None and cancelled.is_set():
                    child.kill()
                    raise ForestFitError("the forest-fitting child was stopped") from None
                if time.monotonic() > deadline:
                    child.kill()
                    raise ForestFitError(f"the forest-fitting child did not answer within "
                                         f"{timeout:.0f} s ({len(jobs)} forests)") from None
    done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-ERROR_SHOWN:]
        raise ForestFitError(f"the forest-fitting child exited with {done.returncode}: {stderr}")
    try:
        answers = msgpack.unpackb(done.stdout)["forests"]
        if len(answers) != len(jobs):
            raise ForestFitError(f"the forest-fitting child answered {len(answers)} of "
                                 f"{len(jobs)} jobs")
        return [ForestFitError(str(a["error"])) if "error" in a else Forest.from_wire(a)
                for a in answers]
    except ModelStateError as e:
        raise ForestFitError(f"the forest-fitting child answered unusable arrays: {e}") from e
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as e:
        raise ForestFitError(f"the forest-fitting child answered nonsense: {e!r}") from e


def _fit_one(job: dict) -> dict:
    try:
        shape = tuple(job["shape"])
        inputs = np.frombuffer(job["inputs"], dtype="<f8").reshape(shape)
        forest = Forest.fit(inputs, seed=int(job["seed"]),
                            n_estimators=int(job["n_estimators"]),
                            contamination=job["contamination"])
        return forest.to_wire()
    except Exception as e:  # one bad job must not cost the others theirs
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> int:
    os.nice(CHILD_NICENESS)
    request = msgpack.unpackb(sys.stdin.buffer.read())
    answer = {"forests": [_fit_one(job) for job in request["jobs"]]}
    sys.stdout.buffer.write(msgpack.packb(answer))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
