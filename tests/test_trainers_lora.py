"""LoRA through peft: the trainers take a peft model as is, train only its adapters through the fused
LM-head path, and DPO uses the base model (adapters disabled) as its reference."""

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _trainers import train_losses  # noqa: E402

from rlhf_fast.demo import build_tokenizer, make_preference_pairs, make_sft_dataset, tiny_model  # noqa: E402
from rlhf_fast.trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

TOKENIZER = build_tokenizer()


def _lora_model():
    model = tiny_model("llama", vocab_size=len(TOKENIZER), seed=0, hidden_size=32, layers=2, heads=4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return peft.get_peft_model(model, config)


def _frozen_and_adapters(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    return frozen, adapters


def _changed(model, before):
    params = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(params[n].detach(), p)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_sft_trains_only_the_adapters(tmp_path, fused):
    model = _lora_model()
    frozen, adapters = _frozen_and_adapters(model)
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), lr=1e-2, micro_batch_size=8, max_length=48, max_steps=12,
                    progress_bar=False, fused=fused, seed=0)  # fmt: skip
    SFTTrainer(model, TOKENIZER, make_sft_dataset(48, 0), config=cfg).train()
    losses = list(train_losses(tmp_path / "sft").values())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert not _changed(model, frozen)  # the base weights never move
    assert _changed(model, adapters)  # lora_B starts at 0: both A and B must have moved for B to change
    assert any("lora_B" in n for n in _changed(model, adapters))


def test_dpo_uses_the_base_model_as_reference(tmp_path):
    # At step 0 the adapters are the identity (lora_B = 0), so policy == reference and the sigmoid loss is
    # -log sigmoid(0) = log 2 exactly as for a copied reference; afterwards only the adapters move.
    model = _lora_model()
    frozen, adapters = _frozen_and_adapters(model)
    pairs = make_preference_pairs(16, 0, beta_bt=50.0)
    cfg = DPOConfig(output_dir=str(tmp_path / "dpo"), lr=1e-2, micro_batch_size=4, max_length=48, max_steps=4,
                    progress_bar=False, beta=0.1, seed=0)  # fmt: skip
    trainer = DPOTrainer(model, TOKENIZER, pairs, config=cfg)
    trainer.train()
    losses = list(train_losses(tmp_path / "dpo").values())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert not _changed(model, frozen) and _changed(model, adapters)
