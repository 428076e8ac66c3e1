"""The whole Deep Speech network on a GPU through the persistent kernel (every test here is marked
`cuda` and skips itself without one): the same network on the float64-accumulating reference
backend gives the same CTC loss, logits and parameter gradients; under bf16 autocast, as
mixed-precision training runs it, a few optimiser steps on one batch lower the loss."""

import copy

import pytest
import torch
import torch.nn.functional as F

from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig
from asr.ops import build

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    build.load("cuda")
    return torch.device("cuda")


def _network(backend: str, cell: str = "relu", bidirectional: bool = True) -> DeepSpeech:
    torch.manual_seed(0)
    config = DeepSpeechConfig(conv_channels=(8, 8), conv_kernels=((11, 11), (11, 5)),
                              conv_strides=((2, 3), (2, 1)), rnn_cell=cell, rnn_layers=3, rnn_hidden=96,
                              bidirectional=bidirectional, backend=backend)
    return DeepSpeech(config)


def _batch(device, N=5, T=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(N, T, 80, generator=g)
    lengths = torch.randint(T // 3, T + 1, (N,), generator=g)
    lengths[0] = T
    targets = torch.randint(1, 29, (N, 20), generator=g)
    target_lengths = torch.randint(5, 21, (N,), generator=g)
    return features.to(device), lengths.to(device), targets.to(device), target_lengths


def _ctc(net, features, lengths, targets, target_lengths):
    logits, out_lengths = net(features, lengths)  # (T', N, V)
    log_probs = logits.float().log_softmax(-1)
    return F.ctc_loss(log_probs, targets, out_lengths, target_lengths, zero_infinity=True), logits


def _relative(x, ref, floor=1e-30):
    """Relative error norm; `floor` keeps gradients that are zero up to rounding (a BatchNorm scale
    followed by another BatchNorm) from turning into large relative errors of tiny numbers."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(floor)).item()


@pytest.mark.parametrize("cell,bidirectional", [("relu", True), ("tanh", False)])
def test_network_on_persistent_kernel_matches_reference_backend(gpu, cell, bidirectional):
    ours = _network("persistent", cell, bidirectional).to(gpu)
    ref = copy.deepcopy(ours)
    for layer in ref.rnns:
        layer.backend = "reference"
    assert all(layer.backend == "persistent" for layer in ours.rnns)
    batch = _batch(gpu)
    torch.backends.cudnn.allow_tf32 = False  # the conv front end identical in both, and in plain fp32
    try:
        loss_ours, logits_ours = _ctc(ours, *batch)
        loss_ours.backward()
        loss_ref, logits_ref = _ctc(ref, *batch)
        loss_ref.backward()
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert torch.isfinite(loss_ours)
    assert _relative(logits_ours, logits_ref) < 1e-4
    assert abs(loss_ours.item() - loss_ref.item()) < 1e-4 * abs(loss_ref.item())
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p_ours.grad is not None, name
        assert _relative(p_ours.grad, p_ref.grad, floor=1e-2) < 1e-3, name


def test_bf16_autocast_steps_lower_the_loss(gpu):
    net = _network("persistent").to(gpu)
    batch = _batch(gpu)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, logits_bf16 = _ctc(net, *batch)
    with torch.no_grad():
        _, logits_fp32 = _ctc(net, *batch)
    assert logits_bf16.dtype == torch.bfloat16
    assert _relative(logits_bf16, logits_fp32) < 5e-2  # bf16 operands, fp32 accumulation
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = _ctc(net, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
