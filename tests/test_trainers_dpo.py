"""DPOTrainer on tiny models built from configs (random weights, offline tokenizer)."""

import math
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _trainers import ACCUMULATION_STEP, assert_accumulation_matches, metrics, params

from rlhf_fast.demo import build_tokenizer, make_preference_pairs, tiny_model
from rlhf_fast.trainers import DPOConfig, DPOTrainer, latest_checkpoint
from rlhf_fast.trainers import data as tdata
from rlhf_fast.trainers.dpo import REFERENCE_FILE, DPOLoss, collate_pairs, reference_logps

TOKENIZER = build_tokenizer()
PAD = tdata.pad_id_of(TOKENIZER)
SMALL = dict(hidden_size=32, layers=2, heads=4, max_positions=64)
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _model(kind="llama", seed=0, dropout=0.0):
    model = tiny_model(kind, vocab_size=len(TOKENIZER), seed=seed, **SMALL)
    for m in model.modules():  # dropout makes the RNG state matter on resume
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model


def _pairs(n, seed):
    # beta_bt = 50: the labeller follows the true reward almost always, so the pairs are separable
    return make_preference_pairs(n, seed, beta_bt=50.0)


def _config(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), lr=1e-2, micro_batch_size=4, max_length=48, progress_bar=False,
                max_steps=4, seed=0, beta=0.5)  # fmt: skip
    return DPOConfig(**{**base, **kw})


def _train_records(run_dir):
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def test_bf16_autocast_starts_at_the_reference(tmp_path):
    """Under bf16 autocast the reference log-probs and the policy's come from the same bf16 head: before any
    update (lr ~ 0) every reward is 0 and the loss is log 2 (a float32 reference head against the bf16
    policy's would leave margins of bf16 rounding)."""
    cfg = _config(tmp_path, bf16=True, max_steps=1, lr=1e-12)
    trainer = DPOTrainer(_model(), TOKENIZER, _pairs(8, 0), None, cfg)
    trainer.train()
    (record,) = _train_records(tmp_path / "run").values()
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6) and record["rewards/margins"] == 0.0, record


def test_loss_goes_down_and_reward_accuracy_rises(tmp_path):
    cfg = _config(tmp_path, max_steps=12, micro_batch_size=8)
    trainer = DPOTrainer(_model(), TOKENIZER, _pairs(32, 0), _pairs(8, 1), cfg)
    last = trainer.train()
    records = metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    assert {"loss", "pairs", "tokens", "lr", "grad_norm", *REWARD_KEYS} <= set(train[0])
    assert {f"eval_{k}" for k in ("loss", *REWARD_KEYS)} <= set(last)
    first, final = train[:3], train[-3:]
    assert sum(r["loss"] for r in final) < 0.5 * sum(r["loss"] for r in first)
    assert sum(r["rewards/accuracies"] for r in final) / 3 > 0.8
    assert sum(r["rewards/accuracies"] for r in first) / 3 < 0.8
    assert final[-1]["rewards/margins"] > 0
    for r in train:  # the margin is the difference of the mean rewards
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        # z = (pc - rc) - (pr - rr) = 0 when the policy is the reference.
        # sigmoid: -logsigmoid(0) = log(1 + e^0) = log 2
        ("sigmoid", 0.0, math.log(2)),
        # conservative: -(1 - ls) * logsigmoid(0) - ls * logsigmoid(0) = log 2 for any ls
        ("sigmoid", 0.3, math.log(2)),
        # hinge: relu(1 - beta * 0) = 1
        ("hinge", 0.0, 1.0),
        # ipo: (0 - 1 / (2 * beta))**2 = (1 / (2 * 0.5))**2 = 1
        ("ipo", 0.0, 1.0),
        # robust: (-(1 - ls) * logsigmoid(0) + ls * logsigmoid(0)) / (1 - 2 ls) = (1 - 2 ls) log 2 / (1 - 2 ls)
        ("robust", 0.2, math.log(2)),
    ],
)  # fmt: skip
def test_loss_at_step_0_when_the_policy_is_its_reference(tmp_path, loss_type, label_smoothing, expected):
    cfg = _config(tmp_path, loss_type=loss_type, label_smoothing=label_smoothing, max_steps=1)
    trainer = DPOTrainer(_model(), TOKENIZER, _pairs(8, 2), _pairs(6, 3), cfg)
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(expected, rel=1e-5)
    for key in REWARD_KEYS:  # beta * (logp - ref_logp) = 0; accuracy counts chosen > rejected strictly
        assert before[f"eval_{key}"] == pytest.approx(0.0, abs=1e-5)
    trainer.train()
    assert _train_records(tmp_path / "run")[1]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_every_loss_type_trains(tmp_path, loss_type):
    start = params(_model())
    trainer = DPOTrainer(_model(), TOKENIZER, _pairs(8, 4), config=_config(tmp_path, loss_type=loss_type, max_steps=2))
    out = trainer.train()
    assert all(math.isfinite(out[k]) for k in ("loss", "grad_norm", *REWARD_KEYS))
    assert out["grad_norm"] > 0
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4


@pytest.mark.parametrize(
    ("kind", "options"),
    [("llama", {}), ("gpt2", {"nll_coef": 0.5, "average_logprobs": True, "loss_type": "ipo"})],
)
def test_fused_and_logits_paths_give_the_same_losses(tmp_path, kind, options):
    rows, eval_rows = _pairs(12, 5), _pairs(4, 6)
    records, evals = {}, {}
    for fused in (True, False):
        cfg = _config(tmp_path, f"fused{fused}", fused=fused, max_steps=3, chunk_bytes=4096, **options)
        trainer = DPOTrainer(_model(kind), TOKENIZER, rows, eval_rows, cfg)
        evals[fused] = trainer.train()
        records[fused] = _train_records(tmp_path / f"fused{fused}")
    assert records[True].keys() == records[False].keys() == {1, 2, 3}
    for step in records[True]:
        for key in ("loss", *REWARD_KEYS):
            assert records[True][step][key] == pytest.approx(records[False][step][key], rel=1e-4, abs=1e-5), key
    for key in ("eval_loss", *(f"eval_{k}" for k in REWARD_KEYS)):
        assert evals[True][key] == pytest.approx(evals[False][key], rel=1e-4, abs=1e-5), key


def test_resume_gives_the_identical_next_loss(tmp_path):
    # 12 pairs, 2 per micro-batch, 2 micro-batches per step: an epoch is 3 steps, so the checkpoint at
    # step 4 sits mid-epoch after a reshuffle
    rows, eval_rows = _pairs(12, 7), _pairs(4, 8)

    def config(name):
        return _config(tmp_path, name, micro_batch_size=2, grad_accum_steps=2, max_steps=6, save_every=4,
                       eval_every=2, warmup_steps=2)  # fmt: skip

    full = DPOTrainer(_model("gpt2", dropout=0.1), TOKENIZER, rows, eval_rows, config("full"))
    full.train()
    expected = metrics(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    assert (ckpt / REFERENCE_FILE).is_file()

    # another initialization: its copy as a reference would give other log-probs, so equal losses
    # show that the cached ones came from the checkpoint
    resumed = DPOTrainer(_model("gpt2", seed=5, dropout=0.1), TOKENIZER, rows, eval_rows, config("r"))
    resumed.train(resume_from=ckpt)
    got = metrics(tmp_path / "r")
    assert [r["step"] for r in got] == [5, 6, 6]  # train records and the final evaluation
    timeless = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in (*expected[-3:], *got)]
    assert timeless[3:] == timeless[:3]  # exact
    for (k, a), b in zip(params(full.model).items(), params(resumed.model).values(), strict=True):
        assert torch.equal(a, b), k

    other = DPOTrainer(_model("gpt2"), TOKENIZER, _pairs(12, 9), eval_rows, config("o"))
    with pytest.raises(ValueError, match="reference log-probs of other train_data"):
        other.train(resume_from=ckpt)


@pytest.mark.parametrize("nll_coef", [0.0, 1.0])
def test_grad_accumulation_1x8_and_4x2_make_the_same_update(tmp_path, nll_coef):
    # With adam_eps = 1 the first AdamW update is lr * g / (|g| + 1), a smooth function of the
    # gradient, so equal parameters mean equal gradients. The pairs have different lengths, so a
    # per-micro-batch token mean in the NLL term would make the two splits differ.
    rows = _pairs(8, 10)
    assert len({len(r["chosen"]) for r in rows}) > 1
    start = params(_model())
    assert_accumulation_matches(
        lambda mbs, accum: DPOTrainer(
            _model(), TOKENIZER, rows,
            config=_config(
                tmp_path, f"{mbs}x{accum}", micro_batch_size=mbs, grad_accum_steps=accum, **ACCUMULATION_STEP,
                nll_coef=nll_coef,
            ),
        ),
        start,
    )  # fmt: skip


def test_nll_term_is_each_chosen_responses_mean_token_nll(tmp_path):
    batch = collate_pairs(tdata.preference_examples(_pairs(3, 11), TOKENIZER, max_length=48, name="d"), PAD)
    batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = torch.zeros(3)
    model = _model().eval()
    with torch.no_grad():
        plain, _ = DPOLoss(_config(tmp_path)).loss(model, batch)
        with_nll, _ = DPOLoss(_config(tmp_path, nll_coef=2.0)).loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:3, :-1]
        targets = batch["labels"][:3, 1:]
        logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        mask = targets != tdata.IGNORE_INDEX
        nll = (-(logp * mask).sum(-1) / mask.sum(-1)).sum()  # summed over pairs: the loop divides by pairs
    torch.testing.assert_close(with_nll.double() - plain.double(), 2.0 * nll, rtol=1e-5, atol=1e-5)


def test_the_reference_never_changes(tmp_path):
    ref = _model(seed=0)
    frozen = params(ref)
    cfg = _config(tmp_path, max_steps=3, save_every=1)
    trainer = DPOTrainer(_model(seed=0), TOKENIZER, _pairs(8, 12), config=cfg, ref_model=ref)
    trainer.train()
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    for k, v in ref.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, frozen[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.ref_model is None  # released once its log-probs were cached


def test_default_reference_is_a_copy_taken_before_training(tmp_path):
    model = _model()
    initial = _model()  # same seed: the weights the copy must hold
    rows = _pairs(8, 13)
    trainer = DPOTrainer(model, TOKENIZER, rows, config=_config(tmp_path, max_steps=2))
    assert trainer.ref_model is not model
    trainer.train()
    pairs = tdata.preference_examples(rows, TOKENIZER, max_length=48, name="d")
    chosen, rejected = reference_logps(initial, pairs, pad_id=PAD, batch_size=3, config=trainer.config,
                                       device=torch.device("cpu"), bf16=False)  # fmt: skip
    got_chosen = torch.tensor([p["ref_chosen_logps"] for p in trainer.train_pairs])
    got_rejected = torch.tensor([p["ref_rejected_logps"] for p in trainer.train_pairs])
    torch.testing.assert_close(got_chosen, chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_rejected, rejected, rtol=1e-5, atol=1e-4)
    assert (chosen < 0).all() and (rejected < 0).all()


def test_a_peft_style_model_is_its_own_reference_with_adapters_disabled(tmp_path):
    # A stand-in for peft: the "adapter" is a delta on the LM head; disable_adapter() removes it for
    # the duration of the block, as peft's context manager does.
    base = _model()
    model = _model()
    head = model.get_output_embeddings().weight
    delta = 0.5 * torch.randn_like(head)
    with torch.no_grad():
        head += delta
    calls = []

    @contextmanager
    def disable_adapter():
        calls.append(model.training)
        with torch.no_grad():
            head.sub_(delta)
        try:
            yield
        finally:
            with torch.no_grad():
                head.add_(delta)

    model.disable_adapter = disable_adapter
    rows = _pairs(6, 14)
    trainer = DPOTrainer(model, TOKENIZER, rows, config=_config(tmp_path, max_steps=1))
    assert trainer.ref_model is None and trainer.uses_disabled_adapters
    trainer.train()
    assert calls == [False]  # once, in eval mode
    assert model.training
    pairs = tdata.preference_examples(rows, TOKENIZER, max_length=48, name="d")
    chosen, _ = reference_logps(base, pairs, pad_id=PAD, batch_size=8, config=trainer.config,
                                device=torch.device("cpu"), bf16=False)  # fmt: skip
    got = torch.tensor([p["ref_chosen_logps"] for p in trainer.train_pairs])
    torch.testing.assert_close(got, chosen, rtol=1e-5, atol=1e-4)


def test_reference_free_needs_no_reference(tmp_path):
    cfg = _config(tmp_path, reference_free=True, max_steps=2)
    trainer = DPOTrainer(_model(), TOKENIZER, _pairs(8, 15), config=cfg)
    assert trainer.ref_model is None and not trainer.uses_disabled_adapters
    out = trainer.train()
    assert all(math.isfinite(out[k]) for k in ("loss", *REWARD_KEYS))
    assert not (latest_checkpoint(tmp_path / "run") / REFERENCE_FILE).exists()
    with pytest.raises(ValueError, match="ref_model is given but config field 'reference_free' is True"):
        DPOTrainer(_model(), TOKENIZER, _pairs(8, 15), config=cfg, ref_model=_model())


def test_pairs_label_the_responses_only_and_truncate_the_prompt_from_the_left():
    row = {"prompt": "the movie was", "chosen": " great.", "rejected": " dull and long."}
    (pair,) = tdata.preference_examples([row], TOKENIZER, max_length=48, name="d")
    for side, text in (("chosen", "great. <eos>"), ("rejected", "dull and long. <eos>")):
        ex = pair[side]
        labelled = [t for t in ex["labels"] if t != tdata.IGNORE_INDEX]
        assert TOKENIZER.decode(labelled) == text
        assert ex["labels"][-len(labelled) :] == ex["input_ids"][-len(labelled) :]
        assert TOKENIZER.decode(ex["input_ids"][: -len(labelled)]) == "<bos> the movie was"

    long_prompt = {"prompt": "the movie was " + "really " * 20 + "long and", "chosen": " great.",
                   "rejected": " dull and long."}  # fmt: skip
    (pair,) = tdata.preference_examples([long_prompt], TOKENIZER, max_length=12, max_prompt_length=4, name="d")
    rejected = pair["rejected"]
    n_prompt = rejected["labels"].index(next(t for t in rejected["labels"] if t != tdata.IGNORE_INDEX))
    # the longer response (5 tokens with EOS) leaves 7 prompt tokens: BOS and the prompt's last 6
    assert n_prompt == 7
    assert TOKENIZER.decode(rejected["input_ids"][:n_prompt]) == "<bos> really really really really long and"
    assert pair["chosen"]["input_ids"][:n_prompt] == rejected["input_ids"][:n_prompt]
    assert len(rejected["input_ids"]) == 12

    (pair,) = tdata.preference_examples([{**long_prompt, "rejected": " dull" * 20}], TOKENIZER, max_length=12,
                                        max_prompt_length=4, name="d")  # fmt: skip
    # a response longer than max_length: the prompt keeps max_prompt_length tokens, the response is cut
    assert TOKENIZER.decode(pair["rejected"]["input_ids"][:4]) == "<bos> really long and"
    assert len(pair["rejected"]["input_ids"]) == 12 and pair["rejected"]["input_ids"][-1] != TOKENIZER.eos_token_id


# -- bad input fails before any training, with the name of what is wrong --------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [({"beta": 0.0}, "'beta' must be > 0"), ({"beta": -0.1}, "'beta' must be > 0"),
     ({"loss_type": "kto"}, "'loss_type' must be one of"),
     ({"label_smoothing": 0.5}, "'label_smoothing' must be < 0.5"),
     ({"label_smoothing": 0.1, "loss_type": "ipo"}, "'label_smoothing' applies to loss_type 'sigmoid' and 'robust'"),
     ({"nll_coef": -1.0}, "'nll_coef' must be >= 0"),
     ({"max_prompt_length": 48, "max_length": 48}, "max_prompt_length"),
     ({"betta": 0.1}, "unknown config key 'betta'.*did you mean 'beta'")],
)  # fmt: skip
def test_bad_config_names_the_field(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DPOConfig.from_dict(values)


def test_bad_input_fails_before_training(tmp_path):
    cfg = _config(tmp_path)
    rows = _pairs(4, 16)
    del rows[1]["rejected"]
    with pytest.raises(ValueError, match=r"train_data\[1\] is missing column 'rejected'"):
        DPOTrainer(_model(), TOKENIZER, rows, config=cfg)
    with pytest.raises(ValueError, match=r"eval_data\[0\] is missing column 'chosen'"):
        DPOTrainer(_model(), TOKENIZER, _pairs(4, 16), [{"prompt": "a", "completion": "b"}], config=cfg)
    with pytest.raises(TypeError, match=r"train_data\[0\]\['chosen'\] must be a string"):
        DPOTrainer(_model(), TOKENIZER, [{"prompt": "a", "chosen": 1, "rejected": "b"}], config=cfg)
    model = _model()
    with pytest.raises(ValueError, match="ref_model is the model being trained"):
        DPOTrainer(model, TOKENIZER, _pairs(4, 16), config=cfg, ref_model=model)
    assert not (tmp_path / "run").exists()
