"""Thin trainers on ``transformers`` models, every loss from rlhf_fast (by default through the fused
LM-head path). One file per trainer; :mod:`rlhf_fast.trainers.loop` is the loop they share."""

from rlhf_fast.trainers.config import TrainConfig
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.loop import TrainLoop, latest_checkpoint
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, ValueHeadModel
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

__all__ = [
    "DPOConfig", "DPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer",
    "TrainConfig", "TrainLoop", "ValueHeadModel", "latest_checkpoint",
]  # fmt: skip
