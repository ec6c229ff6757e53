"""Opacus's own examples (mnist, cifar10 in every mode, imdb; dcgan and
char-lstm are in test_opacus_examples_gan_rnn.py) run with
ppml_fast's PrivacyEngine after changing one import (issue 17 item 2).

The model definitions and training loops below are copied from pytorch/opacus at commit
4d0ebc84613d214fbfd37fbfd1390e3747a625ce (examples/*.py), as written, with their licence notice:

    Copyright (c) Meta Platforms, Inc. and affiliates.
    Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
    except in compliance with the License. You may obtain a copy of the License at
    http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to in
    writing, software distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.

Every changed line (nothing else differs in the copied model and loop code):
- all examples: ``from opacus import PrivacyEngine`` -> ``from ppml_fast import PrivacyEngine``.
- data: the torchvision/HF datasets (downloads) become synthetic tensors of the same shapes
  (MNIST 1x28x28, CIFAR10 3x32x32, IMDB token-id dicts, names as byte ids), the argparse
  ``args`` a Namespace with small sizes, ``device`` "cpu"; each ``main()`` is inlined in its test
  for one epoch (the ``disable_dp`` branches, DDP/DPDDP, torchcsprng and the test-set
  evaluation left out; cifar10's checkpoint dict is built, not written).
- cifar10.py's ``grad_sample_mode="no_op"`` branch (``from opacus.grad_sample.functorch import
  make_functional`` and ``p.grad_sample = g``) is not copied: ppml_fast computes its own
  per-sample gradients and keeps no per-sample state on tensors (STYLE.md); "no_op" is refused
  at make_private (tested). "ghost" is run as Opacus's tutorials call it (make_private(criterion=)
  returning four values); cifar10.py itself would unpack three.
- dcgan.py: one line added, ``with netD.same_records():`` around the discriminator's two
  forwards (real rows, then the generated rows paired with them); as written the step is
  refused with a PrivacyError naming that fix (tested).
- char-lstm keeps ``from opacus.layers import DPGRU, DPLSTM, DPRNN`` (ppml_fast has no RNN
  layers of its own; Opacus's go through their inner Linear layers).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from ppml_fast import PrivacyEngine  # was: from opacus import PrivacyEngine

from ._opacus_util import _assert_trained, _params, _printed

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- examples/mnist.py (SampleConvNet, train) -----------------------------------------------


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        # x of shape [B, 1, 28, 28]
        x = F.relu(self.conv1(x))  # -> [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # -> [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 32, 4, 4]
        x = x.view(-1, 32 * 4 * 4)  # -> [B, 512]
        x = F.relu(self.fc1(x))  # -> [B, 32]
        x = self.fc2(x)  # -> [B, 10]
        return x

    def name(self):
        return "SampleConvNet"


def mnist_train(args, model, device, train_loader, optimizer, privacy_engine, epoch):
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _batch_idx, (data, target) in enumerate(tqdm(train_loader)):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if not args.disable_dp:
        epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
        print(
            f"Train Epoch: {epoch} \t"
            f"Loss: {np.mean(losses):.6f} "
            f"(ε = {epsilon:.2f}, δ = {args.delta})"
        )
    else:
        print(f"Train Epoch: {epoch} \t Loss: {np.mean(losses):.6f}")


def test_mnist(capsys):
    torch.manual_seed(0)
    args = argparse.Namespace(batch_size=16, lr=0.1, sigma=1.0, max_per_sample_grad_norm=1.0,
                              delta=1e-5, disable_dp=False, secure_rng=False)
    device = torch.device("cpu")
    data = TensorDataset(torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,)))
    train_loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=0)
    # main(), as written:
    model = SampleConvNet().to(device)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0)
    privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
    )
    before = _params(model)
    mnist_train(args, model, device, train_loader, optimizer, privacy_engine, 1)
    losses = _printed(capsys, "Loss: ")
    _assert_trained(before, model, privacy_engine, args.delta, losses)
    assert len(privacy_engine.accountant) == 1 and privacy_engine.accountant.history[0][2] == 3


# ---- examples/cifar10.py (convnet, train; the "no_op" branch left out, see the docstring) ----


def convnet(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(128, num_classes, bias=True),
    )


def accuracy(preds, labels):
    return (preds == labels).mean()


def cifar10_train(args, model, train_loader, optimizer, privacy_engine, epoch, device):
    model.train()
    criterion = nn.CrossEntropyLoss()

    losses = []
    top1_acc = []

    for i, (images, target) in enumerate(tqdm(train_loader)):
        images = images.to(device)
        target = target.to(device)

        # compute output
        output = model(images)

        loss = criterion(output, target)
        preds = np.argmax(output.detach().cpu().numpy(), axis=1)
        labels = target.detach().cpu().numpy()

        # measure accuracy and record loss
        acc1 = accuracy(preds, labels)
        top1_acc.append(acc1)

        # compute gradient and do SGD step
        loss.backward()

        losses.append(loss.item())

        # make sure we take a step after processing the last mini-batch in the
        # epoch to ensure we start the next epoch with a clean state
        optimizer.step()
        optimizer.zero_grad()

        if i % args.print_freq == 0:
            if not args.disable_dp:
                epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
                print(
                    f"\tTrain Epoch: {epoch} \t"
                    f"Loss: {np.mean(losses):.6f} "
                    f"Acc@1: {np.mean(top1_acc):.6f} "
                    f"(ε = {epsilon:.2f}, δ = {args.delta})"
                )


def _cifar10_run(capsys, grad_sample_mode, optim_name="SGD", clip_per_layer=False):
    """cifar10.py's main() on one CPU process, up to the end of epoch 1 (with its cosine
    schedule written into optimizer.param_groups and the optimizer's state_dict checkpoint)."""
    torch.manual_seed(0)
    args = argparse.Namespace(grad_sample_mode=grad_sample_mode, batch_size=8, lr=0.1,
                              momentum=0.9, weight_decay=0, print_freq=1, sigma=1.5,
                              max_per_sample_grad_norm=10.0, disable_dp=False, secure_rng=False,
                              delta=1e-5, optim=optim_name, lr_schedule="cos", epochs=2,
                              start_epoch=1, clip_per_layer=clip_per_layer, workers=0)
    device = "cpu"
    generator = None
    train_dataset = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.batch_size, generator=generator,
        num_workers=args.workers,
    )
    model = convnet(num_classes=10)
    model = model.to(device)
    if args.optim == "SGD":
        optimizer = optim.SGD(
            model.parameters(),
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
    elif args.optim == "RMSprop":
        optimizer = optim.RMSprop(model.parameters(), lr=args.lr)
    elif args.optim == "Adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr)
    if args.clip_per_layer:
        # Each layer has the same clipping threshold. The total grad norm is still bounded by `args.max_per_sample_grad_norm`.
        n_layers = len(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        )
        max_grad_norm = [
            args.max_per_sample_grad_norm / np.sqrt(n_layers)
        ] * n_layers
    else:
        max_grad_norm = args.max_per_sample_grad_norm

    privacy_engine = PrivacyEngine(
        secure_mode=args.secure_rng,
    )
    clipping = "per_layer" if args.clip_per_layer else "flat"
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        grad_sample_mode=args.grad_sample_mode,
    )
    before = _params(model)
    epoch = args.start_epoch
    if args.lr_schedule == "cos":
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / (args.epochs + 1)))
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
    cifar10_train(args, model, train_loader, optimizer, privacy_engine, epoch, device)
    state = {"epoch": epoch + 1, "state_dict": model.state_dict(),
             "optimizer": optimizer.state_dict()}  # save_checkpoint's dict, not written
    assert optimizer.original_optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert "state_dict" in state and state["optimizer"] is not None
    losses = _printed(capsys, "Loss: ")
    _assert_trained(before, model, privacy_engine, args.delta, losses)
    assert len(losses) == 2


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_cifar10_grad_sample_modes(capsys, mode):
    _cifar10_run(capsys, mode)


@pytest.mark.parametrize("optim_name", ["RMSprop", "Adam"])
def test_cifar10_optimizers_and_per_layer_clipping(capsys, optim_name):
    _cifar10_run(capsys, "hooks", optim_name=optim_name, clip_per_layer=optim_name == "Adam")


def test_cifar10_no_op_mode_is_refused_by_name():
    """cifar10.py's "no_op" mode hands make_private per-sample gradients on ``p.grad_sample``;
    ppml_fast computes its own and says so instead of training without clipping."""
    model = convnet(num_classes=10)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)),
                        batch_size=2)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        PrivacyEngine().make_private(module=model, optimizer=optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                     grad_sample_mode="no_op")
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_cifar10_ghost_with_the_returned_criterion(capsys):
    """cifar10.py's loop with grad_sample_mode="ghost" as Opacus's ghost tutorials call it:
    make_private(criterion=) returns four values and the loss is the returned criterion's."""
    torch.manual_seed(0)
    model = convnet(num_classes=10)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))),
                        batch_size=8)
    privacy_engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    model, optimizer, criterion_gc, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
        noise_multiplier=1.5, max_grad_norm=10.0, grad_sample_mode="ghost")
    before = _params(model)
    losses = []
    for images, target in train_loader:
        output = model(images)
        loss = criterion_gc(output, target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    _assert_trained(before, model, privacy_engine, 1e-5, losses)


# ---- examples/imdb.py (SampleNet, binary_accuracy, padded_collate, train) -------------------


class SampleNet(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        x = self.emb(x)
        x = x.transpose(1, 2)
        x = self.pool(x).squeeze()
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        return x

    def name(self):
        return "SampleNet"


def binary_accuracy(preds, y):
    correct = (y.long() == torch.argmax(preds, dim=1)).float()
    acc = correct.sum() / len(correct)
    return acc


def imdb_padded_collate(batch, padding_idx=0):
    x = pad_sequence(
        [elem["input_ids"] for elem in batch],
        batch_first=True,
        padding_value=padding_idx,
    )
    y = torch.stack([elem["label"] for elem in batch]).long()
    return x, y


def imdb_train(args, model, train_loader, optimizer, privacy_engine, epoch):
    criterion = nn.CrossEntropyLoss()
    losses = []
    accuracies = []
    device = torch.device(args.device)
    model = model.train().to(device)

    for data, label in tqdm(train_loader):
        data = data.to(device)
        label = label.to(device)

        optimizer.zero_grad()
        predictions = model(data).squeeze(1)
        loss = criterion(predictions, label)
        acc = binary_accuracy(predictions, label)

        loss.backward()
        optimizer.step()

        losses.append(loss.item())
        accuracies.append(acc.item())

    if not args.disable_dp:
        epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
        print(
            f"Train Epoch: {epoch} \t"
            f"Train Loss: {np.mean(losses):.6f} "
            f"Train Accuracy: {np.mean(accuracies):.6f} "
            f"(ε = {epsilon:.2f}, δ = {args.delta})"
        )


def test_imdb(capsys):
    """imdb.py: Adam, shuffle=True and poisson_sampling=False (accounted as shuffled batches, one
    Gaussian per epoch, with a warning), variable-length token ids padded by its collate_fn."""
    torch.manual_seed(0)
    args = argparse.Namespace(batch_size=8, lr=0.02, sigma=0.56, max_per_sample_grad_norm=1.0,
                              delta=1e-5, device="cpu", disable_dp=False, secure_rng=False,
                              workers=0)
    vocab = 100  # len(tokenizer)
    train_dataset = [{"input_ids": torch.randint(1, vocab, (int(n),)), "label": torch.tensor(n % 2)}
                     for n in torch.randint(5, 30, (24,))]
    train_loader = DataLoader(
        train_dataset,
        num_workers=args.workers,
        batch_size=args.batch_size,
        collate_fn=imdb_padded_collate,
        shuffle=True,
    )
    model = SampleNet(vocab_size=vocab).to(torch.device(args.device))
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
        poisson_sampling=False,
    )
    before = _params(model)
    imdb_train(args, model, train_loader, optimizer, privacy_engine, 1)
    _assert_trained(before, model, privacy_engine, args.delta, _printed(capsys, "Train Loss: "))
    # shuffled batches accounted as such: one epoch, one Gaussian (privacy/sampling.py)
    assert privacy_engine.accountant.history == [(0.56, 1.0, 1)]
