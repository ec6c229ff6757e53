"""The DP step on real models (issue 16's table): BERT, RoBERTa, BERT with frozen embeddings,
GPT-2, ViT, ResNet-18-GN, GPT-2/BERT + LoRA, LSTM and GRU classifiers from tiny configs, each
step non-private, with ppml_fast and with Opacus 1.6 (hooks, ghost), interleaved in one process,
with peak step memory. The same as ``ppml-fast bench --only models``; the code is
:mod:`ppml_fast.benchmarks.models` (models: :mod:`ppml_fast.benchmarks.model_zoo`). Run::

    pip install ".[bench]"   # Opacus, transformers, peft
    OMP_NUM_THREADS=2 python bench/bench_models.py [--models bert gpt2] [--steps 20] [--json]
    python bench/bench_models.py --quick          # a smoke run (tiny sizes, 3 steps)

Not a pytest file (no tests here): ``pytest bench`` collects nothing from it.
"""

import sys

from ppml_fast.benchmarks.models import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/bench_models.py"))
