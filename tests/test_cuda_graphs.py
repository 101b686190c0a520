"""train.cuda_graphs: its errors and GraphedForward's dispatch on the CPU; on a GPU, the graphed train step against
the eager one, step by step, and a trainer.py run."""
import copy

import pytest
import torch

from conftest import ROOT, TINY
from htr import training
from htr.benchmarks import benchmark
from htr.cuda_graphs import GraphedForward, check_cuda_graphs
from models import HTRNet, ctc_loss
from utils import UserError, load_config

CONFIG = ROOT / "config.yaml"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def tiny_cfg(*extra):
    return load_config(CONFIG, TINY + ["train.cuda_graphs=true", *extra])


def test_trainer_refuses_cuda_graphs_on_the_cpu(tiny_overrides):
    cfg = load_config(CONFIG, tiny_overrides + ["train.cuda_graphs=true"])
    with pytest.raises(UserError, match="train.cuda_graphs=true needs a CUDA GPU, and this run is on cpu: set "
                                        "device=cuda, or set train.cuda_graphs=false"):
        training.Trainer(cfg)


@pytest.mark.parametrize("extra, processes, message", [
    (["arch.audio.enabled=true"], 1, "arch.audio.enabled=true gives every batch readings of another length "
                                     "\\(dynamic shapes\\)"),
    (["train.use_llm=true"], 1, "the LLM path \\(train.use_llm=true\\) feeds the LM texts of every length "
                                "\\(dynamic shapes\\)"),
    ([], 2, "runs in one process, and this run has 2: launch one process"),
])
def test_cuda_graphs_refuse_dynamic_shapes_and_several_processes(extra, processes, message):
    with pytest.raises(UserError, match=message):
        check_cuda_graphs(tiny_cfg(*extra), torch.device("cuda"), processes)


def test_benchmark_refuses_cuda_graphs_on_the_cpu():
    with pytest.raises(UserError, match="train.cuda_graphs=true needs a CUDA GPU"):
        benchmark(tiny_cfg(), "config.yaml")


class StandInCapture:
    """What make_graphed_callables does to the module, on the CPU: warm-up and capture runs in train mode (which
    move the BatchNorm statistics), then module.forward replaced by the 'graphed' function, counted."""

    def __init__(self):
        self.calls, self.shapes = 0, []

    def __call__(self, module, sample_args):
        eager = module.forward
        for _ in range(4):
            eager(*sample_args)

        def graphed(images):
            self.calls += 1
            self.shapes.append(tuple(images.shape))
            return eager(images)
        module.forward = graphed


def test_graphed_forward_replays_the_captured_shape_only_and_keeps_the_buffers():
    cfg = tiny_cfg("arch.rnn_dropout=0")
    model = HTRNet(cfg.arch, n_classes=6).train()
    reference = copy.deepcopy(model)
    capture = StandInCapture()
    forward = GraphedForward(model, capture)
    full, short = torch.rand(4, 1, 32, 256), torch.rand(3, 1, 32, 256)
    out, expected = forward(full, None), reference(full)      # one train step's forward each
    torch.testing.assert_close(out.logits, expected.logits)
    for b, ref in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, ref), "the capture's warm-up left the BatchNorm statistics moved"
    forward(short, None)                           # the epoch's shorter last batch: eager
    forward(full, None)
    assert capture.shapes == [(4, 1, 32, 256), (4, 1, 32, 256)]
    model.eval()
    with torch.no_grad():
        forward(full, None)                        # validation: eager
    assert capture.calls == 2
    assert model.forward.__func__ is HTRNet.forward, "the model itself stays eager (validation, export)"


def cuda_batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((b,), 3)
    return (torch.rand(b, 1, 32, 256, generator=g).cuda(), torch.randint(1, 6, (3 * b,), generator=g), lengths)


def train_steps(model, forward, batches) -> list:
    """Loss and gradients of each step, with an AdamW step between them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    for images, targets, lengths in batches:
        out = forward(images, None)
        loss = ctc_loss(out.logits, targets, lengths) + 0.1 * ctc_loss(out.shortcut, targets, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        seen.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        optimizer.step()
    return seen


@gpu
def test_graphed_steps_equal_eager_steps_without_dropout():
    cfg = tiny_cfg("device=cuda", "arch.rnn_dropout=0")
    torch.manual_seed(0)
    eager = HTRNet(cfg.arch, n_classes=6).cuda().train()
    graphed = copy.deepcopy(eager)
    batches = [cuda_batch(seed=s) for s in range(5)] + [cuda_batch(b=3, seed=5)]      # a short last batch
    for (loss_e, grads_e), (loss_g, grads_g) in zip(train_steps(eager, eager, batches),
                                                     train_steps(graphed, GraphedForward(graphed), batches)):
        assert loss_g == pytest.approx(loss_e, rel=1e-4)
        for ge, gg in zip(grads_e, grads_g):
            torch.testing.assert_close(gg, ge, rtol=1e-3, atol=1e-5)


@gpu
def test_graphed_steps_with_dropout_match_eager_in_distribution():
    cfg = tiny_cfg("device=cuda", "arch.rnn_dropout=0.5", "arch.rnn_layers=3")
    torch.manual_seed(0)
    eager = HTRNet(cfg.arch, n_classes=6).cuda().train()
    graphed = copy.deepcopy(eager)
    images, targets, lengths = cuda_batch()
    losses = {}                                    # the same weights and line at every step: dropout alone varies
    for name, forward in (("eager", eager), ("graphed", GraphedForward(graphed))):
        losses[name] = torch.tensor([ctc_loss(forward(images, None).logits, targets, lengths).item()
                                     for _ in range(40)])
    assert losses["graphed"].std() > 0, "dropout must draw new masks at every replay"
    assert losses["graphed"].mean() == pytest.approx(losses["eager"].mean().item(), rel=0.05)


@gpu
def test_trainer_runs_with_cuda_graphs(tiny_overrides):
    cfg = load_config(CONFIG, tiny_overrides + ["device=cuda", "train.cuda_graphs=true", "train.num_epochs=3"])
    trainer = training.Trainer(cfg)
    trainer.fit()
    assert isinstance(trainer.forward, GraphedForward) and trainer.forward.shape == (4, 1, 32, 256)
    assert trainer.step == 6
