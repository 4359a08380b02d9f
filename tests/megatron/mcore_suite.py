"""Run many cases in one spawned world, to pay the cost of starting processes and importing
megatron-core once (tests only).

``run_cases(rank, world, cases)``: ``cases`` is a list of ``(name, function, args)``; each
function is a worker of :mod:`mcore_parity` / :mod:`mcore_bad_input`. Between cases the model
parallel state is torn down, so each case initialises its own layout. A failing case records its
traceback and the next case runs; the result maps names to ``("ok", value)`` or ``("error", text)``.
"""

from __future__ import annotations

import traceback

import torch


def run_cases(rank, world, cases):
    from megatron.core import parallel_state as ps

    results = {}
    for name, fn, args in cases:
        try:
            results[name] = ("ok", fn(rank, world, *args))
        except Exception:  # recorded for the test to report
            results[name] = ("error", traceback.format_exc())
        finally:
            ps.destroy_model_parallel()
            torch.distributed.barrier()
    return results
