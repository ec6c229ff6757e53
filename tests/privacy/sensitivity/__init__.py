"""The adversarial sensitivity suite (issue 14): the engine's contract, run in CI.

Every configuration runs one DP step with the noise removed and asserts (1) the clipped sum
equals a float64 per-record reference and (2) one record moves it by at most the bound, with
adversarial records (``_harness``). Files by theme: ``test_layers`` (every supported layer x
grad-sample mode x clipping mode), ``test_layer_options``, ``test_sharing_loops`` (sharing,
models called twice, checkpointing, virtual batches, accumulation), ``test_attacks`` (record
order and mixing, loop details), ``test_hf`` (GPT-2, BERT, LoRA), ``test_ddp`` (2 gloo ranks),
``test_dtypes`` (float32/bfloat16/float16/float64) and ``test_checker``
(``ppml_fast.audit.check_sensitivity`` on the same models).
"""
