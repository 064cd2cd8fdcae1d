"""A model with peftkit methods applied inside transformers.Trainer, torch.compile, and HF gradient
checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import TrainConfig, Trainer

from helpers import snapshot
from trainer_data import adapter_tensors, classification_data, lm_data, lora_bert
from zoo import CASES, TinyTransformer


def test_trains_inside_transformers_trainer(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    import transformers

    model = lora_bert()
    base_before = {
        k: v for k, v in snapshot(model).items() if "lora_" not in k and "trained" not in k
    }
    adapters_before = adapter_tensors(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    hf = transformers.Trainer(model=model, args=args, train_dataset=classification_data(12))
    result = hf.train()
    assert result.global_step == 3
    optimised = {id(p) for g in hf.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in peftkit.trainable_parameters(model)}
    after = adapter_tensors(model)
    assert any(not torch.equal(after[k], v) for k, v in adapters_before.items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_before.items())  # base untouched


def _outputs_and_grads(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(ids)
    out.pow(2).mean().backward()
    grads = [p.grad.clone() for p in peftkit.trainable_parameters(model)]
    for p in peftkit.trainable_parameters(model):
        p.grad = None
    return out.detach(), grads


def _compile_case(backend: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply_lora(model, r=4, targets=["q_proj", "v_proj", "up"], dropout=0.0)
    from helpers import perturb

    perturb(model)
    ids = torch.randint(50, (2, 7), generator=torch.Generator().manual_seed(1))
    eager_out, eager_grads = _outputs_and_grads(model, ids)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # no graph breaks in adapters
    out, grads = _outputs_and_grads(compiled, ids)
    assert torch.allclose(out, eager_out, atol=1e-5)
    for g, e in zip(grads, eager_grads, strict=True):
        assert torch.allclose(g, e, atol=1e-5)
    peftkit.merge(compiled)  # model operations see through the compiled wrapper
    assert torch.allclose(compiled(ids), eager_out, atol=1e-4)


def test_torch_compile_matches_eager_outputs_and_gradients() -> None:
    _compile_case("aot_eager")  # dynamo + AOT autograd; the inductor run is marked slow


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    _compile_case("inductor")


@pytest.mark.slow
def test_trainer_compile_option_matches_eager(tmp_path: Path) -> None:
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = TinyTransformer()
        peftkit.apply_lora(model, r=4, targets=["q_proj", "v_proj"])
        config = TrainConfig(
            max_steps=3, batch_size=4, lr=1e-2, task="causal_lm", compile=compile_, progress=False
        )
        Trainer(model, config).fit(lm_data(12))
        results.append(adapter_tensors(model))
    for key, value in results[0].items():
        assert torch.allclose(results[1][key], value, atol=1e-5), key


def test_gradient_checkpointing_for_hf_models_gives_the_same_step() -> None:
    results = []
    for checkpointing in (False, True):
        model = CASES["llama"].build()
        peftkit.apply_lora(model, r=4, targets=["q_proj", "v_proj"])
        config = TrainConfig(
            max_steps=2,
            batch_size=4,
            lr=1e-2,
            gradient_checkpointing=checkpointing,
            progress=False,
            eval_every=None,
            save_every=None,
        )
        trainer = Trainer(model, config)
        trainer.fit([{"input_ids": ids} for ids in lm_data(8)])
        flag = getattr(model, "is_activation_checkpointing", None)
        if flag is None:
            flag = model.is_gradient_checkpointing
        assert flag == checkpointing
        results.append((adapter_tensors(model), [r["loss"] for r in trainer.history]))
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
    for key, value in results[0][0].items():
        assert torch.allclose(results[1][0][key], value, atol=1e-6), key
    with pytest.raises(ValueError, match="needs an HF model"):
        Trainer(TinyTransformer(), TrainConfig(max_steps=1, gradient_checkpointing=True)).fit(
            lm_data(4)
        )
