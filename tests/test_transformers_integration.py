"""lm_head_logprobs on tiny transformers models built from configs (random weights, no hub)."""

import pytest
import torch

from rlhf_fast import reference

transformers = pytest.importorskip("transformers")
from rlhf_fast.integrations.transformers import lm_head_logprobs  # noqa: E402

VOCAB = 301


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt2():  # tied input/output embeddings
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def _gemma2():  # final logit soft-capping
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config)


_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _granite():  # logits / logits_scaling
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**_SMALL, logits_scaling=3.0))


def _hyperclovax():  # logits * logits_scaling: Granite's attribute, inverted
    return transformers.HyperCLOVAXForCausalLM(transformers.HyperCLOVAXConfig(**_SMALL, logits_scaling=3.0))


def _cohere():  # logits * logit_scale
    return transformers.CohereForCausalLM(transformers.CohereConfig(**_SMALL, logit_scale=0.5))


def _mpt():  # declares logit_scale, never applies it
    config = transformers.MptConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, logit_scale=0.5
    )  # fmt: skip
    return transformers.MptForCausalLM(config)


def _llama4_text():  # base_model_prefix names no attribute: base_model is the model itself
    config = transformers.Llama4TextConfig(**_SMALL, intermediate_size_mlp=64, head_dim=8, num_local_experts=2)
    return transformers.Llama4ForCausalLM(config)


MODELS = {
    "llama": _llama, "gpt2": _gpt2, "gemma2": _gemma2, "granite": _granite, "hyperclovax": _hyperclovax,
    "cohere": _cohere, "mpt": _mpt, "llama4_text": _llama4_text,
}  # fmt: skip


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_the_models_own_logits(name, backend):
    import rlhf_fast as rf

    if not rf.backends()[backend].available:
        pytest.skip(rf.backends()[backend].detail)
    torch.manual_seed(0)
    model = MODELS[name]().float().eval()  # no dropout: both forwards must see the same network
    with torch.no_grad():  # logits of a few units (not ~0.01), so that a scale or cap left out shows
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt

    logp, ent = lm_head_logprobs(
        model, input_ids, attention_mask, labels, temperature=0.8, with_entropy=True, chunk_bytes=4096, backend=backend
    )
    grads = torch.autograd.grad((logp.sum() + 0.1 * ent.sum()), list(model.parameters()), allow_unused=True)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    ref_lp, ref_h = reference.token_logprobs_and_entropy(logits, labels[:, 1:], temperature=0.8)
    ref_grads = torch.autograd.grad((ref_lp.sum() + 0.1 * ref_h.sum()), list(model.parameters()), allow_unused=True)

    torch.testing.assert_close(logp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_h, rtol=1e-5, atol=1e-5)
    assert (logp[labels[:, 1:] == -100] == 0).all()
    with torch.no_grad():  # the log-probs alone take another op (linear_token_logprobs): the same numbers
        logp_only = lm_head_logprobs(
            model, input_ids, attention_mask, labels, temperature=0.8, chunk_bytes=4096, backend=backend
        )
    torch.testing.assert_close(logp_only, ref_lp, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        if theirs is None:
            assert ours is None or not ours.any()
            continue
        # float32 sums in another order: error relative to the gradient's scale
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * max(1.0, theirs.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_under_autocast_the_head_runs_in_the_autocast_dtype(backend):
    """A float32 Llama's final norm returns float32 hidden states even under bf16 autocast, while its own
    lm_head then computes bf16 logits: the fused head follows the model (bf16 GEMMs, as fast as the model's
    own head, where float32 ones would be several times slower on a GPU) and gives its log-probs."""
    import rlhf_fast as rf
    from rlhf_fast.integrations.transformers import final_hidden_states, head_inputs

    if not rf.backends()[backend].available:
        pytest.skip(rf.backends()[backend].detail)
    torch.manual_seed(0)
    model = _llama().float().eval()
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = final_hidden_states(model, input_ids)
        fused_inputs = head_inputs(model, hidden)
        logp = lm_head_logprobs(model, input_ids, backend=backend)
        logits = model(input_ids=input_ids).logits[:, :-1]
    assert hidden.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert fused_inputs[0].dtype == fused_inputs[1].dtype == torch.bfloat16
    ref = reference.token_logprobs(logits.double(), input_ids[:, 1:])
    torch.testing.assert_close(logp.double(), ref, rtol=0.0, atol=0.05)  # bf16 logits: 2^-8 of a few units


def test_default_labels_ignore_padding():
    model = _gpt2()
    input_ids = torch.randint(0, VOCAB, (2, 7))
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        logp = lm_head_logprobs(model, input_ids, attention_mask, backend="torch")
    assert logp.shape == (2, 6)
    assert (logp[1, 3:] == 0).all() and (logp[0] < 0).all()
    # labels are checked in the caller's shapes, not in the shifted ones the op would see
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 7\), got \(2, 6\)"):
        lm_head_logprobs(model, input_ids, attention_mask, input_ids[:, 1:], backend="torch")


def test_peft_lora_model_goes_through_its_adapters():
    # a LoRA-wrapped model: the hidden states must come from the adapted decoder (not the wrapper, whose
    # forward returns logits), and gradients must reach the adapter weights only
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _llama().float().eval(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0 (adapter = identity); make it matter
            torch.nn.init.normal_(p, std=0.1)
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    logp = lm_head_logprobs(model, input_ids, backend="torch")
    adapters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logp.sum(), adapters)
    ref = reference.token_logprobs(model(input_ids=input_ids).logits[:, :-1], input_ids[:, 1:])
    ref_grads = torch.autograd.grad(ref.sum(), adapters)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        base = lm_head_logprobs(model, input_ids, backend="torch")
    assert (base - logp).abs().max() > 1e-3  # the adapters changed the model, and disabling them shows it


def _bert_decoder():  # BERT's LM head runs dense + gelu + LayerNorm before the projection
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        is_decoder=True,
    )  # fmt: skip
    return transformers.BertLMHeadModel(config)


def _granite_unknown():  # a scaling this module does not know: Granite's forward, another model_type
    model = _granite()
    model.config.model_type = "granite_unknown"
    return model


@pytest.mark.parametrize("make", [_bert_decoder, _granite_unknown], ids=["bert", "unknown-scaling"])
def test_a_head_that_cannot_be_reproduced_is_refused(make):
    torch.manual_seed(0)
    model = make()
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with pytest.raises(ValueError, match=f"cannot reproduce the logits of {type(model).__name__}"):
        lm_head_logprobs(model, input_ids, backend="torch")


def test_head_check_runs_once_and_leaves_the_model_and_rng_alone():
    from rlhf_fast.integrations import transformers as integration

    torch.manual_seed(0)
    model = _llama().train()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    rng = torch.get_rng_state()
    integration.lm_head(model)
    integration.lm_head(model)
    assert len(calls) == 1  # one probe forward, then cached
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
