"""Issue 19's privacy-utility table: DP-SGD (Poisson), DP-SGD (shuffled batches, honest
epsilon), DP-FTRL tree aggregation and banded matrix factorization (fixed order; cyclic
Poisson) at epsilon 1, 3, 8 on digits and a generated LSTM text task, each with a one-run audit
and its epsilon cross-checked against dp_accounting. The code is
:mod:`ppml_fast.benchmarks.privacy_utility`; run::

    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/privacy_utility.py [--quick] [--seeds 3]
        [--tasks digits text] [--json out.json]

(also ``ppml-fast bench --only privacy-utility [--quick]``). The full run takes 15-30 min on
one loaded core; ``--quick`` (CI size) under a minute.
"""

from ppml_fast.benchmarks.privacy_utility import main

if __name__ == "__main__":
    raise SystemExit(main())
