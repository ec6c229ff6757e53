"""Adapters for users of other libraries; each submodule imports its library only when imported.

- :mod:`ppml_fast.integrations.flower` — :class:`NativeFedAvg`, a Flower ``FedAvg`` strategy whose
  aggregation runs on the native ``weighted_aggregate`` op (needs ``pip install 'ppml_fast[flower]'``)
- :mod:`ppml_fast.integrations.huggingface` — :class:`DPTrainer` and :class:`PrivacyArguments`: DP-SGD
  inside the Hugging Face ``Trainer`` (needs transformers 5.x)
- :mod:`ppml_fast.integrations.opacus` — what differs from Opacus, the migration table, and
  :func:`~ppml_fast.integrations.opacus.migration_report` (no Opacus install needed)
"""
