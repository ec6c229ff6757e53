"""Where ppml_fast's DP step spends its time on the real models of issue 16 (torch.profiler:
capture, norms, factors, clipped sums, noise, optimizer, other). The same as
``ppml-fast bench --only profile``; the code is :mod:`ppml_fast.benchmarks.profile_step`. Run::

    OMP_NUM_THREADS=2 python bench/profile_models.py [--models bert resnet18-gn] [--steps 5]
"""

import sys

from ppml_fast.benchmarks.profile_step import main

if __name__ == "__main__":
    sys.exit(main())
