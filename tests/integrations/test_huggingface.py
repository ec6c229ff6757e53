"""DPTrainer (ppml_fast.integrations.huggingface): the Hugging Face Trainer's step is the engine's
DP step on the same Poisson sample; gradient accumulation splits one sample (equal to one
logical batch's clipped sum, against a float64 per-record reference); epsilon logged is the
accountant's; the budget stop; empty samples; LoRA; schedulers; per-record losses.

Models: a one-layer BERT built from a config in float64, dropout off (no download)."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import peft  # in the test extra (pyproject.toml): imported, never skipped
import pytest
import torch
import transformers
from torch.utils.data import DataLoader, Dataset

from ppml_fast.accounting import calibration
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.integrations.huggingface import DPTrainer, PrivacyArguments, per_record_loss
from ppml_fast.privacy import PrivacyEngine

V, T, K, N = 32, 6, 3, 48
DELTA = 1e-3


class Records(Dataset):
    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, V, (n, T), generator=g)
        self.labels = torch.randint(0, K, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
                "labels": self.labels[i]}


def bert(seed: int = 0):
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=T, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=K)
    return transformers.BertForSequenceClassification(cfg).double()


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Spy(DPTrainer):
    """Records the parts the Trainer hands over and the chunk sizes that run."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.parts, self.chunks = [], []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.parts.append({k: v.clone() for k, v in inputs.items()} | {"_n": inputs.logical_size})
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_per_record_loss(self, model, inputs):
        self.chunks.append(len(inputs["labels"]))
        return super().compute_per_record_loss(model, inputs)


def logical_batches(parts: list[dict], k: int) -> list[dict]:
    """The parts, k at a time, joined back into the logical batches they came from."""
    out = []
    for i in range(0, len(parts), k):
        group = parts[i:i + k]
        joined = {key: torch.cat([p[key] for p in group]) for key in group[0] if key != "_n"}
        assert len(joined["labels"]) == group[0]["_n"]
        out.append(joined)
    return out


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def clipped_sum_reference(model, batch: dict, c: float) -> dict:
    """Sum over records of min(1, C / ||g_i||) g_i, g_i the gradient of record i's own loss, each
    record run alone in float64."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(batch["labels"])):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        torch.nn.functional.cross_entropy(out.logits, batch["labels"][i:i + 1]).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum((x * x).sum() for x in g.values()))
        f = min(1.0, c / (float(norm) + 1e-6))
        for n in total:
            total[n] += f * g[n]
    model.zero_grad()
    return total


def test_one_step_is_the_engines_step_on_the_same_sample(tmp_path):
    model = bert()
    start = copy.deepcopy(model)
    privacy = PrivacyArguments(noise_multiplier=0.9, target_delta=DELTA, max_grad_norm=0.3,
                               noise_seed=11, sampling_seed=5)
    tr = Spy(model=model, args=targs(tmp_path), train_dataset=Records(), privacy=privacy)
    tr.train()
    (batch,) = logical_batches(tr.parts, 1)
    assert len(batch["labels"]) > 1

    engine = PrivacyEngine(accountant=tr.privacy_engine.accountant_name)
    decay = set(tr.get_decay_parameter_names(start))  # the Trainer's two groups: noise in their order
    groups = [{"params": [p for n, p in start.named_parameters() if (n in decay) == d]} for d in (True, False)]
    ref, opt, _ = engine.make_private(
        module=start, optimizer=torch.optim.SGD(groups, lr=0.5),
        data_loader=DataLoader(Records(), batch_size=8), noise_multiplier=0.9, max_grad_norm=0.3,
        noise_seed=11, loss_reduction="sum")
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    opt.step()
    got, want = params(model), params(start)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12, msg=n)
    assert tr.dp_optimizer.expected_batch_size == opt.expected_batch_size == 8
    assert tr.epsilon() == engine.get_epsilon(DELTA)


def test_accumulation_splits_one_sample_into_the_logical_batch_clipped_sum(tmp_path):
    c, lr, steps = 0.05, 0.5, 2
    runs = {}
    for physical, k in ((2, 4), (8, 1)):
        model = bert()
        privacy = PrivacyArguments(noise_multiplier=0.0, target_delta=DELTA, max_grad_norm=c, sampling_seed=5)
        tr = Spy(model=model, args=targs(tmp_path, per_device_train_batch_size=physical,
                                           gradient_accumulation_steps=k, max_steps=steps),
                 train_dataset=Records(), privacy=privacy)
        tr.train()
        runs[k] = (tr, model)
    (acc, model_acc), (one, model_one) = runs[4], runs[1]
    assert max(acc.chunks) <= 2 and len(acc.chunks) > len(one.chunks)  # physical chunks of <= 2 records
    assert len(acc.parts) == 4 * steps and acc.dp_optimizer.steps == one.dp_optimizer.steps == steps
    batches = logical_batches(acc.parts, 4)
    for a, b in zip(batches, logical_batches(one.parts, 1)):  # the same Poisson samples
        assert torch.equal(a["input_ids"], b["input_ids"])

    ref = bert()  # float64 reference: one clipped sum per logical batch, divided by q N = 8
    for batch in batches:
        s = clipped_sum_reference(ref, batch, c)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p -= lr * s[n] / 8
    want, got_acc, got_one = params(ref), params(model_acc), params(model_one)
    moved = max(float((want[n] - p).abs().max()) for n, p in params(bert()).items())
    assert moved > 1e-3  # the steps did change the model
    for n in want:
        torch.testing.assert_close(got_acc[n], want[n], rtol=0, atol=1e-10, msg=n)
        torch.testing.assert_close(got_one[n], got_acc[n], rtol=0, atol=1e-12, msg=n)


def test_epsilon_logged_is_the_accountants_and_the_target(tmp_path):
    privacy = PrivacyArguments(target_epsilon=2.0, target_delta=DELTA, accountant="rdp")
    tr = DPTrainer(model=bert(), args=targs(tmp_path, max_steps=-1, num_train_epochs=2, logging_steps=3,
                                            eval_strategy="steps", eval_steps=6),
                   train_dataset=Records(), eval_dataset=Records(16, seed=1), privacy=privacy)
    tr.train()
    q, steps = 1 / 6, 12
    evals = [e for e in tr.state.log_history if "eval_loss" in e]  # evaluation runs the unhooked model
    assert [e["step"] for e in evals] == [6, 12] and all(e["epsilon"] > 0 for e in evals)
    sigma = calibration.get_noise_multiplier(target_epsilon=2.0, target_delta=DELTA, sample_rate=q,
                                             steps=steps, accountant="rdp")
    assert tr.dp_optimizer.noise_multiplier == sigma
    logged = [e for e in tr.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [3, 6, 9, 12]
    for e in logged:
        want = calibration.epsilon(noise_multiplier=sigma, sample_rate=q, steps=e["step"], delta=DELTA,
                                   accountant="rdp")
        assert e["epsilon"] == pytest.approx(want, rel=1e-9)
        assert "grad_norm" not in e  # a pre-noise gradient norm would not be private
    final = tr.state.log_history[-1]
    assert "train_loss" in final and final["epsilon"] == tr.epsilon() == tr.privacy_engine.get_epsilon(DELTA)
    assert 2.0 - 0.01 <= final["epsilon"] <= 2.0
    assert tr.dp_optimizer.steps == tr.state.global_step == steps


def test_budget_stop_ends_training_cleanly_and_saves(tmp_path):
    q, sigma = 1 / 6, 1.0
    eps = [calibration.epsilon(noise_multiplier=sigma, sample_rate=q, steps=s, delta=DELTA, accountant="rdp")
           for s in (4, 5)]
    budget = (eps[0] + eps[1]) / 2
    privacy = PrivacyArguments(noise_multiplier=sigma, target_delta=DELTA, max_epsilon=budget, accountant="rdp")
    tr = DPTrainer(model=bert(), args=targs(tmp_path, max_steps=20, save_strategy="steps", save_steps=1000),
                   train_dataset=Records(), privacy=privacy)
    out = tr.train()  # no exception
    assert tr.stopped_by_budget and out.global_step == tr.dp_optimizer.steps == 4
    assert tr.epsilon() == pytest.approx(eps[0], rel=1e-9) and tr.epsilon() <= budget
    saved = torch.load(tmp_path / "out" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert saved["steps"] == 4 and saved["accountant"] == tr.privacy_engine.accountant.state_dict()

    model = bert()
    before = params(model)
    tiny = PrivacyArguments(noise_multiplier=sigma, target_delta=DELTA, max_epsilon=0.01, accountant="rdp")
    tr = DPTrainer(model=model, args=targs(tmp_path), train_dataset=Records(), privacy=tiny)
    with pytest.raises(PrivacyBudgetExceeded, match="nothing was trained"):
        tr.train()
    assert all(torch.equal(p, before[n]) for n, p in params(model).items())


def test_empty_samples_are_noise_only_steps_counted_by_the_accountant(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0, target_delta=DELTA, sampling_seed=1, accountant="rdp")
    tr = Spy(model=bert(), args=targs(tmp_path, per_device_train_batch_size=1, max_steps=-1,
                                      num_train_epochs=1, logging_steps=100),
             train_dataset=Records(24), privacy=privacy)
    seen = []

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append((tr.parts[-1]["_n"], params(tr.model)))

    tr.add_callback(Watch())
    before = params(tr.model)
    tr.train()
    sizes = [n for n, _ in seen]
    assert 0 in sizes and tr.dp_optimizer.steps == tr.state.global_step == 24  # q = 1/24
    want = calibration.epsilon(noise_multiplier=1.0, sample_rate=1 / 24, steps=24, delta=DELTA, accountant="rdp")
    assert tr.epsilon() == pytest.approx(want, rel=1e-9)
    prev = before
    for n, now in seen:  # every step moves the model, also an empty one (its noise)
        assert any(not torch.equal(now[k], prev[k]) for k in now)
        prev = now


def test_lora_trains_only_the_adapters(tmp_path):
    model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                         init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = params(model)
    privacy = PrivacyArguments(target_epsilon=4.0, target_delta=DELTA, accountant="rdp")
    tr = DPTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=Records(), privacy=privacy)
    tr.train()
    after = params(model)
    assert all(not torch.equal(after[n], before[n]) for n in trainable)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trainable)
    assert {id(p) for p in tr.dp_optimizer.params} == {id(p) for n, p in model.named_parameters() if n in trainable}


def test_linear_warmup_scheduler_steps_with_the_dp_optimizer(tmp_path):
    lrs = []
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = transformers.get_linear_schedule_with_warmup(probe, num_warmup_steps=2, num_training_steps=6)
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        probe.step()
        sched.step()
    privacy = PrivacyArguments(noise_multiplier=1.0, target_delta=DELTA, accountant="rdp")
    tr = DPTrainer(model=bert(), args=targs(tmp_path, max_steps=6, learning_rate=0.1, lr_scheduler_type="linear",
                                            warmup_steps=2), train_dataset=Records(), privacy=privacy)
    tr.train()
    logged = [e["learning_rate"] for e in tr.state.log_history if "loss" in e]
    assert logged == pytest.approx(lrs, abs=1e-15) and len(set(logged)) > 2

    model = bert()  # a scheduler the user built on their own optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    user = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    tr = DPTrainer(model=model, args=targs(tmp_path, max_steps=6), train_dataset=Records(),
                   optimizers=(opt, user), privacy=privacy)
    tr.train()
    assert tr.dp_optimizer.original_optimizer is opt and tr.lr_scheduler is user
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15) and user.last_epoch == 6


def test_per_record_loss_is_each_records_own_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, 1:] = -100  # record 0 has one labelled token, record 2 none
    labels[2] = -100
    got = per_record_loss(logits, labels)
    ce = torch.nn.functional.cross_entropy
    assert got[0] == pytest.approx(float(ce(logits[0, :1], labels[0, :1])), rel=1e-12)
    assert got[1] == pytest.approx(float(ce(logits[1], labels[1])), rel=1e-12)
    assert got[2] == 0.0
    # Hugging Face's token mean over the batch is not a per-record mean (weights by token count)
    hf = ce(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert float(hf) != pytest.approx(float(got[:2].mean()), rel=1e-3)
    causal = per_record_loss(logits, labels, causal_lm=True)
    assert causal[1] == pytest.approx(float(ce(logits[1, :-1], labels[1, 1:])), rel=1e-12)
    reg = per_record_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]))
    assert reg.tolist() == [1.0, 1.0]
    multi = per_record_loss(torch.zeros(2, 4), torch.ones(2, 4))
    assert multi == pytest.approx(torch.full((2,), 0.6931471805599453), rel=1e-6)
    with pytest.raises(TypeError, match="compute_per_record_loss"):
        per_record_loss(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_privacy_arguments_and_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
        PrivacyArguments(target_delta=DELTA)
    with pytest.raises(ValueError, match="target_delta"):
        PrivacyArguments(target_epsilon=1.0)
    with pytest.raises(ValueError, match="secure_mode"):
        PrivacyArguments(target_epsilon=1.0, target_delta=DELTA, secure_mode=True, noise_seed=1)
    with pytest.raises(ValueError, match="max_epsilon"):
        PrivacyArguments(noise_multiplier=0.0, target_delta=DELTA, max_epsilon=1.0)
    with pytest.raises(TypeError, match="privacy must be a PrivacyArguments"):
        DPTrainer(model=bert(), args=targs(tmp_path), train_dataset=Records(), privacy={"target_epsilon": 1})
    hub = targs(tmp_path, push_to_hub=True, hub_strategy="all_checkpoints", hub_model_id="x/y")
    with pytest.raises(ValueError, match="noise key"):  # before the Trainer would create the repository
        DPTrainer(model=bert(), args=hub, train_dataset=Records(),
                  privacy=PrivacyArguments(target_epsilon=1.0, target_delta=DELTA))
    with pytest.raises(ValueError, match="auto_find_batch_size"):
        DPTrainer(model=bert(), args=targs(tmp_path, auto_find_batch_size=True), train_dataset=Records(),
                  privacy=PrivacyArguments(target_epsilon=1.0, target_delta=DELTA))


def test_example_fine_tunes_a_bert_built_from_a_config(restore_threads, capsys):
    path = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_dp.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_dp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--records", "512", "--epochs", "1", "--batch-size", "32"])
    assert out["steps"] == 8 and 8.0 - 0.01 <= out["epsilon"] <= 8.0
    assert all("epsilon" in e for e in out["log_history"])
    assert "DP steps" in capsys.readouterr().out
    # the same pipeline without noise (not private) learns the task: the machinery trains
    plain = example.main(["--records", "2048", "--epochs", "3", "--batch-size", "64", "--noise-multiplier", "0"])
    assert plain["steps"] == 48 and plain["accuracy"] > 0.85  # 0.957-0.965 measured (3 runs); chance 0.5


def test_resume_from_a_checkpoint_continues_the_accountant(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0, target_delta=DELTA, accountant="rdp")
    args = targs(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    whole = DPTrainer(model=bert(), args=args, train_dataset=Records(), privacy=privacy)
    whole.train()
    resumed = DPTrainer(model=bert(), args=args, train_dataset=Records(), privacy=privacy)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.dp_optimizer.steps == resumed.state.global_step == 4  # 2 loaded + 2 run
    assert resumed.epsilon() == pytest.approx(whole.epsilon(), rel=1e-12)


def test_padding_collator_of_a_tokenizer_and_empty_samples(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]))
    tok = transformers.BertTokenizer(vocab_file=str(vocab))
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, V - 5, (int(n),), generator=g))
             for n in torch.randint(1, T - 2, (24,), generator=g)]
    data = [dict(tok(t), labels=int(y)) for t, y in zip(texts, torch.randint(0, K, (24,), generator=g))]
    collator = transformers.DataCollatorWithPadding(tok)
    assert not isinstance(collator(data[:2]), dict)  # a BatchEncoding: the empty sample must still be empty
    privacy = PrivacyArguments(noise_multiplier=1.0, target_delta=DELTA, sampling_seed=1, accountant="rdp")
    tr = Spy(model=bert(), args=targs(tmp_path, per_device_train_batch_size=1, max_steps=8),
             train_dataset=data, data_collator=collator, privacy=privacy)
    tr.train()
    sizes = [p["_n"] for p in tr.parts]
    assert 0 in sizes and tr.dp_optimizer.steps == 8
    assert all(len(p["labels"]) == n for p, n in zip(tr.parts, sizes))  # never dataset[0] for an empty one


def test_a_second_train_call_goes_on_accounting_and_stops_at_the_budget(tmp_path):
    q, sigma = 1 / 6, 1.0
    eps = [calibration.epsilon(noise_multiplier=sigma, sample_rate=q, steps=s, delta=DELTA, accountant="rdp")
           for s in (3, 4)]
    privacy = PrivacyArguments(noise_multiplier=sigma, target_delta=DELTA, max_epsilon=sum(eps) / 2,
                               accountant="rdp")
    tr = DPTrainer(model=bert(), args=targs(tmp_path, max_steps=2), train_dataset=Records(), privacy=privacy)
    tr.train()
    assert tr.dp_optimizer.steps == 2 and not tr.stopped_by_budget
    tr.train()  # the same engine: 1 more step fits, the one after would not
    assert tr.stopped_by_budget and tr.dp_optimizer.steps == 3 and tr.optimizer is tr.dp_optimizer
    assert tr.epsilon() == pytest.approx(eps[0], rel=1e-9)
    with pytest.raises(ValueError, match="model_init"):
        DPTrainer(model_init=lambda: bert(), args=targs(tmp_path), train_dataset=Records(), privacy=privacy)


class TokenRecords(Records):
    """Token labels with a different number of labelled positions per record (-100 elsewhere)."""

    def __init__(self, n: int = N, seed: int = 0, causal: bool = False) -> None:
        super().__init__(n, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.token_labels = self.ids.clone() if causal else torch.randint(0, K, (n, T), generator=g)
        keep = torch.rand(n, T, generator=g) < torch.linspace(0.2, 1.0, n)[:, None]
        self.token_labels[~keep] = -100

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "labels": self.token_labels[i]}


def token_model(causal: bool):
    torch.manual_seed(0)
    if causal:
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg).double()
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=T, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=K)
    return transformers.BertForTokenClassification(cfg).double()


@pytest.mark.parametrize("causal", [False, True], ids=["token-classification", "causal-lm"])
def test_token_losses_are_per_record_means_not_the_batch_token_mean(tmp_path, causal):
    """Each record's gradient is that of the model's own loss on the record alone (its token mean),
    whatever the other records' token counts: checked against a float64 per-record reference."""
    c, data = 0.05, TokenRecords(causal=causal)
    model = token_model(causal)
    privacy = PrivacyArguments(noise_multiplier=0.0, target_delta=DELTA, max_grad_norm=c, sampling_seed=3)
    tr = Spy(model=model, args=targs(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2),
             train_dataset=data, privacy=privacy)
    tr.train()
    (batch,) = logical_batches(tr.parts, 2)
    ref = token_model(causal)
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(len(batch["labels"])):
        ref.zero_grad()
        ref(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()  # Hugging Face's loss, one record
        g = {n: p.grad.clone() for n, p in ref.named_parameters()}
        f = min(1.0, c / (float(torch.sqrt(sum((x * x).sum() for x in g.values()))) + 1e-6))
        for n in total:
            total[n] += f * g[n]
    got = params(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            torch.testing.assert_close(got[n], p - 0.5 * total[n] / 8, rtol=0, atol=1e-10, msg=n)


def test_secure_mode_samples_and_noises_from_the_os(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0, target_delta=DELTA, secure_mode=True, accountant="rdp")
    model = bert()
    before = params(model)
    tr = DPTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=Records(), privacy=privacy)
    tr.train()
    assert tr.dp_optimizer.secure_mode and tr.get_train_dataloader().dp_loader.batch_sampler.secure
    assert tr.dp_optimizer.steps == 2 and any(not torch.equal(p, before[n]) for n, p in params(model).items())
