"""Opacus's own examples (dcgan and char-lstm with DPLSTM/DPGRU/DPRNN;
mnist, cifar10 and imdb are in test_opacus_examples.py) run with
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
import contextlib
from statistics import mean

import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from ppml_fast import PrivacyEngine  # was: from opacus import PrivacyEngine

from ._opacus_util import _assert_trained, _params, _printed

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- examples/dcgan.py (Generator, Discriminator, the training loop) ------------------------
# The script's globals, from its argparse defaults except the sizes (ngf/ndf/nz made small).
nz, ngf, ndf, nc = 8, 8, 8, 1


def weights_init(m):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        m.weight.data.normal_(0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)


class Generator(nn.Module):
    def __init__(self, ngpu):
        super(Generator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is Z, going into a convolution
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.GroupNorm(min(32, ndf * 8), ndf * 8),
            nn.ReLU(True),
            # state size. (ngf*8) x 4 x 4
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf * 4), ndf * 4),
            nn.ReLU(True),
            # state size. (ngf*4) x 8 x 8
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf * 2), ndf * 2),
            nn.ReLU(True),
            # state size. (ngf*2) x 16 x 16
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf), ndf),
            nn.ReLU(True),
            # state size. (ngf) x 32 x 32
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
            # state size. (nc) x 64 x 64
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output


class Discriminator(nn.Module):
    def __init__(self, ngpu):
        super(Discriminator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is (nc) x 64 x 64
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 32 x 32
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf * 2), ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 16 x 16
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf * 4), ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 8 x 8
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.GroupNorm(min(32, ndf * 8), ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*8) x 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)

        return output.view(-1, 1).squeeze(1)


def _dcgan(same_records: bool):
    """dcgan.py's script body (epochs=1). ``same_records``: the discriminator's two forwards
    (real rows, then the generated rows paired with them) inside ``netD.same_records()``, the
    one line added; without it the step is refused (two backpropagated forwards before one step
    could be two sampled batches, which ppml_fast cannot tell apart from pairs)."""
    torch.manual_seed(0)
    opt = argparse.Namespace(batch_size=4, lr=0.0002, beta1=0.5, ngpu=1, device="cpu",
                             disable_dp=False, secure_rng=False, sigma=1.0,
                             max_per_sample_grad_norm=1.0, delta=1e-5, epochs=1, workers=0)
    dataset = TensorDataset(torch.randn(8, 1, 64, 64), torch.full((8,), 8))  # digit 8, 64x64
    dataloader = torch.utils.data.DataLoader(
        dataset,
        num_workers=int(opt.workers),
        batch_size=opt.batch_size,
    )
    device = torch.device(opt.device)
    ngpu = int(opt.ngpu)
    netG = Generator(ngpu)
    netG = netG.to(device)
    netG.apply(weights_init)
    netD = Discriminator(ngpu)
    netD = netD.to(device)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    REAL_LABEL = 1.0
    FAKE_LABEL = 0.0

    # setup optimizer
    optimizerD = optim.Adam(netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))

    if not opt.disable_dp:
        privacy_engine = PrivacyEngine(secure_mode=opt.secure_rng)

        netD, optimizerD, dataloader = privacy_engine.make_private(
            module=netD,
            optimizer=optimizerD,
            data_loader=dataloader,
            noise_multiplier=opt.sigma,
            max_grad_norm=opt.max_per_sample_grad_norm,
        )

    optimizerG = optim.Adam(netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    before_d, before_g = _params(netD), _params(netG)
    losses = []

    for epoch in range(opt.epochs):
        data_bar = tqdm(dataloader)
        for i, data in enumerate(data_bar, 0):
            ############################
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            ###########################

            optimizerD.zero_grad(set_to_none=True)

            real_data = data[0].to(device)
            batch_size = real_data.size(0)

            with netD.same_records() if same_records else contextlib.nullcontext():  # added
                # train with real
                label_true = torch.full((batch_size,), REAL_LABEL, device=device)
                output = netD(real_data)
                errD_real = criterion(output, label_true)
                D_x = output.mean().item()

                # train with fake
                noise = torch.randn(batch_size, nz, 1, 1, device=device)
                fake = netG(noise)
                label_fake = torch.full((batch_size,), FAKE_LABEL, device=device)
                output = netD(fake.detach())
                errD_fake = criterion(output, label_fake)

            # below, you actually have two backward passes happening under the hood
            # which opacus happens to treat as a recursive network
            # and therefore doesn't add extra noise for the fake samples
            # noise for fake samples would be unnecesary to preserve privacy

            errD = errD_real + errD_fake
            errD.backward()
            optimizerD.step()
            optimizerD.zero_grad(set_to_none=True)

            D_G_z1 = output.mean().item()

            ############################
            # (2) Update G network: maximize log(D(G(z)))
            ###########################
            optimizerG.zero_grad()

            label_g = torch.full((batch_size,), REAL_LABEL, device=device)
            output_g = netD(fake)
            errG = criterion(output_g, label_g)
            errG.backward()
            D_G_z2 = output_g.mean().item()
            optimizerG.step()

            if not opt.disable_dp:
                epsilon = privacy_engine.accountant.get_epsilon(delta=opt.delta)
                data_bar.set_description(
                    f"epoch: {epoch}, Loss_D: {errD.item()} "
                    f"Loss_G: {errG.item()} D(x): {D_x} "
                    f"D(G(z)): {D_G_z1}/{D_G_z2}"
                    "(ε = %.2f, δ = %.2f)" % (epsilon, opt.delta)
                )
            losses += [errD.item(), errG.item()]
    _assert_trained(before_d, netD, privacy_engine, opt.delta, losses)
    _assert_trained(before_g, netG, privacy_engine, opt.delta, losses)


def test_dcgan_with_same_records():
    _dcgan(same_records=True)


def test_dcgan_as_written_is_refused_naming_the_fix():
    """Opacus sums a record's real and fake per-sample gradients (it "treats [the two
    backward passes] as a recursive network"); ppml_fast refuses until told the rows pair up."""
    from ppml_fast.privacy import PrivacyError

    with pytest.raises(PrivacyError, match="same_records"):
        _dcgan(same_records=False)


# ---- examples/char-lstm-classification.py (CharNNClassifier, padded_collate, train) ---------
VOCAB_SIZE = 256 + 3  # 256 alternatives in one byte, plus 3 special characters.


class CharNNClassifier(nn.Module):
    def __init__(
        self,
        rnn_type,
        embedding_size,
        hidden_size,
        output_size,
        num_layers=1,
        bidirectional=False,
        vocab_size=VOCAB_SIZE,
    ):
        super().__init__()

        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.vocab_size = vocab_size

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = rnn_type(
            embedding_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
        )
        self.out_layer = nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden=None):
        x = self.embedding(x)  # -> [B, T, D]
        x, _ = self.rnn(x, hidden)  # -> [B, T, H]
        x = x[:, -1, :]  # -> [B, H]
        x = self.out_layer(x)  # -> [B, C]
        return x


def char_padded_collate(batch, padding_idx=0):
    x = pad_sequence(
        [elem[0] for elem in batch], batch_first=True, padding_value=padding_idx
    )
    y = torch.stack([elem[1] for elem in batch]).long()

    return x, y


def char_train(
    model,
    criterion,
    optimizer,
    train_loader,
    epoch,
    privacy_engine,
    target_delta,
    device="cuda:0",
):
    model.train()

    accs = []
    losses = []
    for x, y in tqdm(train_loader):
        x = x.to(device)
        y = y.to(device)

        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()

        optimizer.step()
        optimizer.zero_grad()

        preds = logits.argmax(-1)
        n_correct = float(preds.eq(y).sum())
        batch_accuracy = n_correct / len(y)

        accs.append(batch_accuracy)
        losses.append(float(loss))

    printstr = (
        f"\t Epoch {epoch}. Accuracy: {mean(accs):.6f} | Loss: {mean(losses):.6f}"
    )
    try:
        epsilon = privacy_engine.accountant.get_epsilon(delta=target_delta)
        printstr += f" | (ε = {epsilon:.2f}, δ = {target_delta})"
    except AttributeError:
        pass
    print(printstr)
    return


class _Names(Dataset):
    """NamesDataset's samples without the files: (start, bytes of a name, end) ids and a label."""

    def __init__(self, n: int, n_labels: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.samples = [(torch.cat([torch.tensor([256]), torch.randint(97, 123, (int(k),), generator=g),
                                    torch.tensor([257])]), torch.tensor(i % n_labels).long())
                        for i, k in enumerate(torch.randint(3, 10, (n,), generator=g))]

    def __getitem__(self, i):
        return self.samples[i]

    def __len__(self):
        return len(self.samples)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_char_lstm(capsys, mode):
    from opacus.layers import DPGRU, DPLSTM, DPRNN  # as the example imports them

    torch.manual_seed(0)
    args = argparse.Namespace(mode=mode, embedding_size=8, hidden_size=12, n_layers=1,
                              bidirectional=False, learning_rate=2.0, sigma=1.0,
                              max_per_sample_grad_norm=1.5, delta=8e-5, batch_size=8,
                              secure_rng=False, disable_dp=False)
    device = torch.device("cpu")
    train_ds = _Names(16, n_labels=3)
    if args.mode == "rnn":
        rnn_type = DPRNN
    elif args.mode == "gru":
        rnn_type = DPGRU
    elif args.mode == "lstm":
        rnn_type = DPLSTM
    model = CharNNClassifier(
        rnn_type,
        args.embedding_size,
        args.hidden_size,
        3,  # len(ds.labels)
        args.n_layers,
        args.bidirectional,
    )
    model = model.to(device)
    train_loader = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        num_workers=0,
        collate_fn=char_padded_collate,
    )
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
    )
    before = _params(model)
    char_train(model, criterion, optimizer, train_loader, 0, privacy_engine, args.delta,
               device=device)
    _assert_trained(before, model, privacy_engine, args.delta, _printed(capsys, "| Loss: "))
