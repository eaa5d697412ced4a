"""SFTTrainer and the shared loop on tiny models built from configs (random weights, offline tokenizer)."""

import json
import math
import pickle
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _trainers import ACCUMULATION_STEP, assert_accumulation_matches, metrics, params, train_losses

from rlhf_fast.demo import build_tokenizer, make_sft_dataset, tiny_model
from rlhf_fast.trainers import SFTConfig, SFTTrainer, latest_checkpoint
from rlhf_fast.trainers import data as sft_data
from rlhf_fast.trainers.sft import SFTLoss

TOKENIZER = build_tokenizer()
SMALL = dict(hidden_size=32, layers=2, heads=4, max_positions=64)


def _model(kind="llama", seed=0, dropout=0.0):
    model = tiny_model(kind, vocab_size=len(TOKENIZER), seed=seed, **SMALL)
    for m in model.modules():  # the demo models have none; dropout makes the RNG state matter on resume
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model


def _config(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), lr=3e-3, micro_batch_size=4, max_length=48, progress_bar=False,
                max_steps=6, seed=0)  # fmt: skip
    return SFTConfig(**{**base, **kw})


def test_loss_goes_down_and_metrics_are_finite(tmp_path):
    cfg = _config(tmp_path, max_steps=20, eval_every=10, warmup_steps=2, lr=1e-2)
    trainer = SFTTrainer(_model(), TOKENIZER, make_sft_dataset(32, 0), make_sft_dataset(8, 1), cfg)
    before = trainer.evaluate()
    last = trainer.train()
    records = metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    assert {"loss", "loss_tokens", "tokens", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.8 * sum(r["loss"] for r in train[:5]) / 5
    assert last["eval_loss"] < before["eval_loss"]
    assert last["eval_ppl"] == pytest.approx(math.exp(last["eval_loss"]))
    # warm-up then cosine decay
    lrs = [r["lr"] for r in train]
    assert lrs[0] == pytest.approx(cfg.lr / 2) and lrs[1] == pytest.approx(cfg.lr) and lrs[-1] < lrs[2]
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_fused_and_logits_paths_give_the_same_losses(tmp_path, kind):
    rows = make_sft_dataset(16, 2)
    losses = {}
    for fused in (True, False):
        cfg = _config(tmp_path, f"fused{fused}", fused=fused, max_steps=4, chunk_bytes=4096)
        SFTTrainer(_model(kind), TOKENIZER, rows, config=cfg).train()
        losses[fused] = train_losses(tmp_path / f"fused{fused}")
    assert losses[True].keys() == losses[False].keys()
    for step in losses[True]:
        assert losses[True][step] == pytest.approx(losses[False][step], rel=1e-5)


def _resume_config(tmp_path, name):
    # 24 examples, 4 per micro-batch, 2 micro-batches per step: an epoch is 3 steps, so 8 steps cross
    # epochs (a new shuffle) and the checkpoint at step 4 sits mid-epoch
    return _config(tmp_path, name, max_steps=8, grad_accum_steps=2, save_every=4, warmup_steps=2)


def test_resume_continues_bit_for_bit(tmp_path):
    rows = make_sft_dataset(24, 3)
    full = SFTTrainer(_model("gpt2", dropout=0.1), TOKENIZER, rows, config=_resume_config(tmp_path, "full"))
    full.train()
    expected = train_losses(tmp_path / "full")

    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    resumed = SFTTrainer(_model("gpt2", seed=5, dropout=0.1), TOKENIZER, rows, config=_resume_config(tmp_path, "r"))
    resumed.train(resume_from=ckpt)
    got = train_losses(tmp_path / "r")
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == expected[step]  # exact
    for (k, a), b in zip(params(full.model).items(), params(resumed.model).values(), strict=True):
        assert torch.equal(a, b), k


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    rows = make_sft_dataset(24, 3)
    SFTTrainer(_model(dropout=0.1), TOKENIZER, rows, config=_resume_config(tmp_path, "full")).train()
    expected = train_losses(tmp_path / "full")

    calls = {"n": 0}
    loss_fn = SFTLoss.loss

    def interrupting_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-batch of step 3
            signal.raise_signal(signal.SIGINT)
        return loss_fn(self, model, batch)

    monkeypatch.setattr(SFTLoss, "loss", interrupting_loss)
    cfg = _resume_config(tmp_path, "cut")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        SFTTrainer(_model(dropout=0.1), TOKENIZER, rows, config=cfg).train()
    monkeypatch.setattr(SFTLoss, "loss", loss_fn)
    assert latest_checkpoint(cfg.output_dir).name == "step-00000003"  # the step under way was finished
    assert signal.getsignal(signal.SIGINT) is handler  # restored

    SFTTrainer(_model(seed=9, dropout=0.1), TOKENIZER, rows, config=cfg).train(resume_from=True)
    got = train_losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 9))
    assert got == expected


def test_grad_accumulation_normalizes_by_all_tokens_of_the_step(tmp_path):
    # 8 examples of different lengths in one update, as 1 x 8 and as 4 x 2. With adam_eps = 1 the first
    # AdamW update is lr * g / (|g| + 1), a smooth function of the gradient (eps = 1e-8 would make it
    # lr * sign(g) and flip on rounding noise), so equal parameters mean equal gradients.
    rows = make_sft_dataset(8, 4)
    assert len({len(r["completion"]) for r in rows}) > 1
    start = params(_model())
    assert_accumulation_matches(
        lambda mbs, accum: SFTTrainer(
            _model(), TOKENIZER, rows,
            config=_config(
                tmp_path, f"{mbs}x{accum}", micro_batch_size=mbs, grad_accum_steps=accum, **ACCUMULATION_STEP
            ),
        ),
        start,
    )  # fmt: skip


def test_packing_gives_the_loss_of_the_examples_one_by_one():
    examples = sft_data.sft_examples(make_sft_dataset(6, 5), TOKENIZER, max_length=48, name="train_data")
    rows = sft_data.pack(examples, 96)
    assert len(rows) < len(examples)
    assert all(len(r["input_ids"]) <= 96 for r in rows)
    model = _model().eval()
    objective = SFTLoss(SFTConfig(output_dir="unused"))
    pad = sft_data.pad_id_of(TOKENIZER)
    packed, unpacked = sft_data.collate(rows, pad), sft_data.collate(examples, pad)
    assert objective.count(packed) == objective.count(unpacked)
    with torch.no_grad():
        a, _ = objective.loss(model, packed)
        b, _ = objective.loss(model, unpacked)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_training_runs(tmp_path):
    cfg = _config(tmp_path, packing=True, max_length=96, micro_batch_size=2, max_steps=3)
    out = SFTTrainer(_model(), TOKENIZER, make_sft_dataset(16, 6), config=cfg).train()
    assert math.isfinite(out["loss"]) and out["loss_tokens"] > 0


def test_prompt_completion_labels_only_the_completion():
    (ex,) = sft_data.sft_examples([{"prompt": "the movie was", "completion": " great."}], TOKENIZER,
                                  max_length=48, name="d")  # fmt: skip
    labelled = [t for t in ex["labels"] if t != sft_data.IGNORE_INDEX]
    assert TOKENIZER.decode(labelled) == "great. <eos>"
    assert ex["input_ids"][0] == TOKENIZER.bos_token_id
    assert ex["labels"][-len(labelled) :] == ex["input_ids"][-len(labelled) :]


def test_messages_label_the_assistant_turns_only():
    messages = [
        {"role": "user", "content": "the movie was"},
        {"role": "assistant", "content": "great."},
        {"role": "user", "content": "the plot"},
        {"role": "assistant", "content": "was dull."},
    ]
    (ex,) = sft_data.sft_examples([{"messages": messages}], TOKENIZER, max_length=64, name="d")
    assert ex["input_ids"] == TOKENIZER(TOKENIZER.apply_chat_template(messages, tokenize=False),
                                        add_special_tokens=False)["input_ids"]  # fmt: skip
    spans, cur = [], []
    for tok, lab in zip(ex["input_ids"], ex["labels"], strict=True):
        if lab == sft_data.IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(tok)
    if cur:
        spans.append(cur)
    assert [TOKENIZER.decode(s) for s in spans] == ["great. <eos>", "was dull. <eos>"]


def test_messages_train_and_a_template_that_is_not_prefix_stable_is_refused(tmp_path):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in make_sft_dataset(8, 9)]  # fmt: skip
    out = SFTTrainer(_model(), TOKENIZER, rows, config=_config(tmp_path, max_steps=2)).train()
    assert math.isfinite(out["loss"]) and out["loss_tokens"] > 0

    tokenizer = build_tokenizer()
    # a word per turn is written first, so a shorter conversation is not a prefix of a longer one
    tokenizer.chat_template = "{{ 'great ' * (messages | length) }}" + tokenizer.chat_template
    with pytest.raises(ValueError, match=r"train_data\[0\]: the chat template does not render turn 1"):
        SFTTrainer(_model(), tokenizer, rows, config=_config(tmp_path))


def test_text_rows_and_jsonl_files(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in make_sft_dataset(8, 7)))
    out = SFTTrainer(_model(), TOKENIZER, path, config=_config(tmp_path, max_steps=2)).train()
    assert math.isfinite(out["loss"])
    (ex,) = sft_data.sft_examples([{"text": "great movie"}], TOKENIZER, max_length=8, name="d")
    assert ex["labels"] == [sft_data.IGNORE_INDEX, *ex["input_ids"][1:]]
    assert ex["input_ids"][-1] == TOKENIZER.eos_token_id


def test_bf16_autocast_on_cpu(tmp_path):
    rows = make_sft_dataset(8, 8)
    first = {}
    for bf16 in (False, True):
        SFTTrainer(_model(), TOKENIZER, rows, config=_config(tmp_path, f"bf16{bf16}", bf16=bf16, max_steps=2)).train()
        records = metrics(tmp_path / f"bf16{bf16}")
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
        first[bf16] = records[0]["loss"]
    assert first[True] != first[False]  # autocast was on
    assert first[True] == pytest.approx(first[False], rel=2e-2)


def test_rows_from_any_iterable_of_mappings():
    rows = make_sft_dataset(3, 0)
    assert sft_data.load_rows(iter(rows), "train_data") == rows  # e.g. a datasets.Dataset iterates so
    with pytest.raises(TypeError, match=r"train_data\[1\] must be a mapping"):
        sft_data.load_rows([rows[0], "text"], "train_data")
    with pytest.raises(ValueError, match="eval_data is empty"):
        sft_data.load_rows([], "eval_data")
    with pytest.raises(FileNotFoundError, match="train_data: no such JSONL file"):
        sft_data.load_rows("/nonexistent/train.jsonl", "train_data")


# -- bad input fails before any training, with the name of what is wrong --------------------------


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'lrr'.*did you mean 'lr'"):
        SFTConfig.from_dict({"output_dir": str(tmp_path), "lrr": 1e-4})


@pytest.mark.parametrize(
    ("values", "field"),
    [({"lr": -1.0}, "lr"), ({"micro_batch_size": 0}, "micro_batch_size"), ({"betas": [0.9, 1.5]}, "betas"),
     ({"backend": "cuda"}, "backend"), ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"fused": "maybe"}, "fused"),
     ({"max_grad_norm": float("nan")}, "max_grad_norm"), ({"warmup_steps": 3, "warmup_ratio": 0.1}, "warmup_")],
)  # fmt: skip
def test_bad_config_value_names_the_field(values, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SFTConfig.from_dict(values)


def test_config_from_strings_as_yaml_and_overrides_give_them():
    cfg = SFTConfig.from_dict({"lr": "1e-4", "max_steps": "10", "bf16": "false", "betas": [0.9, "0.95"],
                               "chunk_bytes": "null"})  # fmt: skip
    assert (cfg.lr, cfg.max_steps, cfg.bf16, cfg.betas, cfg.chunk_bytes) == (1e-4, 10, False, (0.9, 0.95), None)


def test_missing_column_is_named_before_training(tmp_path):
    rows = make_sft_dataset(4, 0)
    del rows[2]["completion"]
    with pytest.raises(ValueError, match=r"train_data\[2\] is missing column 'completion'"):
        SFTTrainer(_model(), TOKENIZER, rows, config=_config(tmp_path))
    with pytest.raises(ValueError, match=r"eval_data\[0\] has columns \['question'\]"):
        SFTTrainer(_model(), TOKENIZER, make_sft_dataset(4, 0), [{"question": "?"}], config=_config(tmp_path))
    assert not (tmp_path / "run").exists()


def test_checkpoints_hold_no_pickled_objects(tmp_path):
    from safetensors import safe_open

    trainer = SFTTrainer(_model(), TOKENIZER, make_sft_dataset(8, 0), config=_config(tmp_path, max_steps=1))
    trainer.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(ckpt / name, weights_only=True)

    # an object smuggled into a state file is refused, not run
    torch.save({"state": {}, "param_groups": [], "x": _Smuggled()}, ckpt / "optimizer.pt")
    fresh = SFTTrainer(_model(), TOKENIZER, make_sft_dataset(8, 0), config=_config(tmp_path, max_steps=2))
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        fresh.train(resume_from=ckpt)


class _Smuggled:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_model_whose_head_the_fused_path_cannot_reproduce_is_refused_before_training(tmp_path):
    # BERT's LM head transforms the hidden states before its projection; fused=False asks for logits
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        is_decoder=True,
    )  # fmt: skip
    model = transformers.BertLMHeadModel(config)
    with pytest.raises(ValueError, match="cannot reproduce the logits of BertLMHeadModel"):
        SFTTrainer(model, TOKENIZER, make_sft_dataset(4, 0), config=_config(tmp_path))
    SFTTrainer(model, TOKENIZER, make_sft_dataset(4, 0), config=_config(tmp_path, fused=False, max_steps=1)).train()
