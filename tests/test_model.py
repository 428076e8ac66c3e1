"""The Deep Speech network: recurrent layers equal torch.nn.RNN / torch.nn.GRU with copied weights
(outputs and every gradient, uni- and bidirectional, ragged lengths), and the whole network keeps
padded batches independent of their padding."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from asr.errors import UserError
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig, RecurrentLayer

T, N, C, H = 9, 4, 6, 5
LENGTHS = torch.tensor([9, 4, 7, 1])


def _torch_rnn(cell: str, bidirectional: bool) -> nn.Module:
    if cell == "gru":
        return nn.GRU(C, H, bidirectional=bidirectional).double()
    return nn.RNN(C, H, nonlinearity=cell, bidirectional=bidirectional).double()


def _copy_weights(ours: RecurrentLayer, ref: nn.Module, cell: str, directions: int) -> None:
    with torch.no_grad():
        if cell == "gru":
            ours.gru.load_state_dict(ref.state_dict())
            return
        suffixes = ["", "_reverse"][:directions]
        ours.input_projection.weight.copy_(torch.cat([getattr(ref, f"weight_ih_l0{s}") for s in suffixes]))
        ours.input_projection.bias.copy_(torch.cat([getattr(ref, f"bias_ih_l0{s}") + getattr(ref, f"bias_hh_l0{s}")
                                                    for s in suffixes]))
        ours.w_hh.copy_(torch.stack([getattr(ref, f"weight_hh_l0{s}") for s in suffixes]))


def _grads_of_ours(ours: RecurrentLayer, cell: str, directions: int) -> dict[str, torch.Tensor]:
    if cell == "gru":
        return {name: p.grad for name, p in ours.gru.named_parameters()}
    grads = {}
    suffixes = ["", "_reverse"][:directions]
    for d, s in enumerate(suffixes):
        grads[f"weight_ih_l0{s}"] = ours.input_projection.weight.grad[d * H:(d + 1) * H]
        bias_grad = ours.input_projection.bias.grad[d * H:(d + 1) * H]
        grads[f"bias_ih_l0{s}"] = bias_grad  # b_ih and b_hh enter the sum alike, so their grads are equal
        grads[f"bias_hh_l0{s}"] = bias_grad
        grads[f"weight_hh_l0{s}"] = ours.w_hh.grad[d]
    return grads


@pytest.mark.parametrize("cell", ["relu", "tanh", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layer_equals_torch_rnn(cell, bidirectional):
    torch.manual_seed(0)
    directions = 2 if bidirectional else 1
    config = DeepSpeechConfig(rnn_cell=cell, rnn_hidden=H, bidirectional=bidirectional, merge_directions="concat",
                              rnn_batch_norm=False, backend="reference")
    ours = RecurrentLayer(C, config).double()
    ref = _torch_rnn(cell, bidirectional)
    _copy_weights(ours, ref, cell, directions)

    x = torch.randn(T, N, C, dtype=torch.float64)
    mask = torch.arange(T)[:, None] < LENGTHS[None, :]  # (T, N)
    x = x * mask[:, :, None]
    x_ours = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)

    y_ours = ours(x_ours, LENGTHS, mask)  # (T, N, D*H)
    packed = pack_padded_sequence(x_ref, LENGTHS, enforce_sorted=False)
    y_ref, _ = pad_packed_sequence(ref(packed)[0], total_length=T)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-12)
    assert y_ours[~mask].abs().max() == 0, "outputs past a sequence's length must be zero"

    weight = torch.randn_like(y_ref)  # a loss that touches every output differently
    (y_ours * weight).sum().backward()
    (y_ref * weight).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    ours_grads = _grads_of_ours(ours, cell, directions)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("cell", ["relu", "gru"])
def test_summed_directions_are_the_sum_of_concatenated_ones(cell):
    torch.manual_seed(1)
    concat = RecurrentLayer(C, DeepSpeechConfig(rnn_cell=cell, rnn_hidden=H, merge_directions="concat",
                                                rnn_batch_norm=False, backend="reference"))
    summed = RecurrentLayer(C, DeepSpeechConfig(rnn_cell=cell, rnn_hidden=H, merge_directions="sum",
                                                rnn_batch_norm=False, backend="reference"))
    summed.load_state_dict(concat.state_dict())
    x = torch.randn(T, N, C)
    mask = torch.arange(T)[:, None] < LENGTHS[None, :]
    y_concat = concat(x, LENGTHS, mask)
    torch.testing.assert_close(summed(x, LENGTHS, mask), y_concat[..., :H] + y_concat[..., H:])
    assert summed.output_size == H and concat.output_size == 2 * H


def test_relu_cell_is_clipped_at_20():
    config = DeepSpeechConfig(rnn_cell="relu", rnn_hidden=2, bidirectional=False, rnn_batch_norm=False,
                              backend="reference")
    layer = RecurrentLayer(1, config)
    with torch.no_grad():
        layer.input_projection.weight.fill_(100.0)
        layer.input_projection.bias.zero_()
        layer.w_hh.zero_()
    x = torch.ones(3, 1, 1)
    y = layer(x, torch.tensor([3]), torch.ones(3, 1, dtype=torch.bool))
    assert torch.all(y == 20.0)


SMALL = dict(n_mels=16, vocab_size=7, conv_channels=(4, 4), conv_kernels=((5, 5), (3, 5)),
             conv_strides=((2, 2), (2, 1)), rnn_layers=2, rnn_hidden=8, backend="reference")


@pytest.mark.parametrize("overrides", [
    dict(rnn_cell="relu", bidirectional=True),
    dict(rnn_cell="tanh", bidirectional=True, merge_directions="concat"),
    dict(rnn_cell="gru", bidirectional=True),
    dict(rnn_cell="relu", bidirectional=False, lookahead=3),
])
def test_network_output_does_not_depend_on_padding(overrides):
    """In eval mode a sequence's logits are the same alone or padded in a batch with a longer one."""
    torch.manual_seed(2)
    config = DeepSpeechConfig(**SMALL, **overrides)
    net = DeepSpeech(config).eval()
    long, short = torch.randn(50, 16), torch.randn(23, 16)
    batch = torch.zeros(2, 50, 16)
    batch[0], batch[1, :23] = long, short
    with torch.no_grad():
        logits, lengths = net(batch, torch.tensor([50, 23]))
        alone, alone_len = net(short[None], torch.tensor([23]))
    assert logits.shape == (25, 2, 7) and lengths.tolist() == [25, 12]
    assert alone_len.tolist() == [12] and lengths.tolist() == net.output_lengths(torch.tensor([50, 23])).tolist()
    torch.testing.assert_close(logits[:12, 1], alone[:, 0], rtol=1e-4, atol=1e-5)


def test_network_trains_on_a_batch():
    """A few steps of CTC on one batch lower its loss, and every parameter receives a gradient."""
    torch.manual_seed(3)
    net = DeepSpeech(DeepSpeechConfig(**SMALL))
    feats, lengths = torch.randn(3, 40, 16), torch.tensor([40, 31, 20])
    targets, target_lengths = torch.randint(1, 7, (3, 5)), torch.tensor([5, 4, 3])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits, out_lengths = net(feats, lengths)
        loss = nn.functional.ctc_loss(logits.log_softmax(-1), targets, out_lengths, target_lengths, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="rnn_cell"):
        DeepSpeechConfig(rnn_cell="lstm")
    with pytest.raises(UserError, match="lookahead"):
        DeepSpeechConfig(bidirectional=True, lookahead=2)
    with pytest.raises(UserError, match="conv"):
        DeepSpeechConfig(conv_channels=(8,), conv_kernels=((3, 3), (3, 3)), conv_strides=((1, 1),))
    config = DeepSpeechConfig(**SMALL)
    assert DeepSpeechConfig.from_dict(config.to_dict()) == config
    assert config.time_stride == 2


@pytest.mark.parametrize("cell", ["relu", "gru"])
def test_network_runs_under_bf16_autocast(cell):
    """Mixed precision (Lightning's bf16-mixed): the recurrence gets one dtype, gradients stay finite."""
    torch.manual_seed(4)
    net = DeepSpeech(DeepSpeechConfig(**{**SMALL, "backend": "auto"}, rnn_cell=cell))
    feats, lengths = torch.randn(2, 40, 16), torch.tensor([40, 25])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, out_lengths = net(feats, lengths)
        loss = nn.functional.ctc_loss(logits.float().log_softmax(-1), torch.tensor([[1, 2, 3], [4, 5, 0]]),
                                      out_lengths, torch.tensor([3, 2]), zero_infinity=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
