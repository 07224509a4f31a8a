"""A training step with LoRA adapters on a CUDA GPU, where InfoNCE runs the fused Triton
kernel, against the same step on the CPU, where it runs the chunked torch path (the
oracle). Kept apart from tests/test_lora.py, which needs hydra: the GPU machine's image
has neither hydra nor peft, and bench/device_check.sh carries peft's and accelerate's
wheels (bench/README.md) so that this module runs there."""

import pytest
import torch
from parity import perturb_adapters

from biencoder.data.training import Triplet
from biencoder.model.biencoder import BiEncoder
from biencoder.model.lora import LoraSettings
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.step import train_step

pytest.importorskip("peft")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
TRIPLETS = [
    Triplet("what causes scurvy", "a lack of vitamin C", ("Paris", "K2")),
    Triplet("capital of france", "Paris", ("Lyon", "a lack of iron")),
    Triplet("tallest mountain", "Mount Everest, 8849 m", ("K2", "the Alps are old")),
    Triplet("who wrote hamlet", "Shakespeare", ("Marlowe wrote plays too", "Paris")),
]


def step(model_path: str, device: str, impl: str) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(model_path, lora=LoraSettings(r=8, alpha=16.0))
    perturb_adapters(model)
    model = model.to(device).train()
    model.query_tower.encoder.set_dropout(0.0, 0.0)
    task = InfoNCETask(temperature=0.05, impl=impl).to(device)
    result = train_step(model, task, task.make_batch(TRIPLETS))
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(result.loss), grads


def test_a_cuda_lora_step_with_the_fused_loss_equals_the_cpu_step(tiny_model_path):
    loss, grads = step(tiny_model_path, "cuda", "triton")
    expected_loss, expected = step(tiny_model_path, "cpu", "torch")
    assert grads.keys() == expected.keys()
    assert all("lora_" in name for name in expected)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    largest = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        # The two devices sum in other orders: 1e-4 of the largest gradient, which a
        # missing adapter term (zero gradient) or a wrong scale (alpha / r) exceeds.
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-4 * largest, msg=name)
