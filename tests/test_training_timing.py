"""The op-timing callback: it counts the recurrent op's forward and backward FLOPs of training
batches only, and holds nothing of a step's autograd graph once the step is over."""

import gc
import time
import weakref

import torch

from asr.model.deepspeech import Recurrence
from asr.training.timing import BACKWARD_FLOP_FACTOR, OpTiming


def _net() -> torch.nn.Module:
    net = torch.nn.Module()
    net.recurrence = Recurrence("clipped_relu", "reference")
    return net


def test_training_batches_are_timed_and_counted():
    net, timing = _net(), OpTiming()
    timing.attach(net)
    T, N, D, H = 5, 2, 1, 4
    x = torch.randn(T, N, D, H, requires_grad=True)
    w = torch.randn(D, H, H) * 0.1

    net.recurrence(x * 1.0, w, torch.tensor([T, T]))  # outside a training batch: not counted
    assert timing.flops == 0.0 and timing.seconds() == 0.0

    started = time.perf_counter()
    timing.on_train_batch_start(None, None, None, 0)
    y = net.recurrence(x * 1.0, w, torch.tensor([T, 3]))
    y.sum().backward()
    timing.on_train_batch_end(None, None, None, None, 0)
    wall = time.perf_counter() - started
    forward = 2.0 * T * N * D * H * H
    assert timing.flops == forward * (1 + BACKWARD_FLOP_FACTOR)
    # the op's forward and backward lie inside the step: timed, and never longer than the step itself
    assert 0.0 < timing.seconds() <= wall
    assert timing.state_dict() == {"seconds": timing.seconds(), "flops": timing.flops}


def test_a_timed_step_leaves_no_graph_behind():
    """The backward hooks must not refer to the tensors they hang on (a cycle through autograd that
    Python cannot collect: it leaked every step's graph, 10 GB within one epoch of the demo)."""
    net, timing = _net(), OpTiming()
    timing.attach(net)
    timing.on_train_batch_start(None, None, None, 0)
    x = torch.randn(6, 3, 1, 8, requires_grad=True)
    u = x * 2.0  # a non-leaf input, as the network's input projection gives
    freed = weakref.ref(u)
    y = net.recurrence(u, torch.randn(1, 8, 8) * 0.1, torch.tensor([6, 6, 6]))
    y.sum().backward()
    timing.on_train_batch_end(None, None, None, None, 0)
    del u, y
    gc.collect()
    assert freed() is None, "the timed op's input outlived its step"
