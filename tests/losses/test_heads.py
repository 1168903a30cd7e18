"""The chunked loss rebuilds each architecture's own logits: bias, scale and soft-cap included.

For every causal LM that transformers builds tiny here, the head ``output_head`` finds reproduces
``model(...).logits``, and the chunked loss and its gradients equal the dense ones (fp32, 1e-5),
with a cached top-k teacher and with an online teacher of the same architecture.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from potstill.train.tokenizer_match import Compat
from potstill.errors import PotstillError
from potstill.train.heads import model_heads, output_head
from potstill.recipe import TrainSpec
from potstill.train.loop import loss_sums

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# what each architecture needs to build tiny, and the head feature it brings (a non-default
# scale, a soft-cap or a bias), so that a chunked loss ignoring it would differ
ARCHS = {
    "llama": {}, "qwen2": {}, "qwen3": dict(head_dim=8), "mistral": dict(head_dim=8), "olmo2": {}, "stablelm": {},
    "gemma": dict(head_dim=8), "starcoder2": {}, "gpt_neox": {}, "exaone4": {}, "smollm3": {}, "opt": {},
    "bloom": {}, "olmo": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gemma2": dict(head_dim=8, final_logit_softcapping=3.0),  # soft-cap
    "gemma3_text": dict(head_dim=8, final_logit_softcapping=3.0),
    "vaultgemma": dict(head_dim=8, final_logit_softcapping=3.0),
    "nanochat": dict(final_logit_softcapping=3.0),
    "cohere": dict(logit_scale=0.25), "cohere2": dict(logit_scale=0.25),  # logits * scale
    "granite": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0),  # logits / scaling
    "hyperclovax": dict(logits_scaling=3.0),  # logits * scaling
    "falcon_h1": dict(lm_head_multiplier=0.5, head_dim=8),
    "phi": dict(partial_rotary_factor=0.5),  # lm_head has a bias
    "phi3": {}, "falcon": dict(num_kv_heads=2, new_decoder_architecture=True),
}
SLOW = {"falcon_h1"}  # mamba layers in plain torch: its gradients take a minute, so only its logits are checked


def tiny(model_type: str, seed: int = 0):
    extra = ARCHS[model_type]
    fields = {k: v for k, v in BASE.items() if not (model_type == "falcon" and k == "head_dim")} | extra
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    with torch.no_grad():  # some heads start at zero bias: give every bias a value that shows
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias.normal_(0, 1.0)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 11), generator=g)
    attention = torch.ones_like(ids)
    attention[2, 8:] = 0  # one right-padded row
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt carries no loss
    labels[attention == 0] = -100
    logprobs, top = torch.randn(3, 11, V, generator=g).mul(3).log_softmax(-1).topk(8, -1)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "topk_ids": top, "topk_logprobs": logprobs}


@pytest.mark.parametrize("model_type", ARCHS)
def test_the_head_reproduces_the_models_own_logits(model_type):
    model = tiny(model_type)
    b = batch()
    head = output_head(model)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    assert torch.allclose(head.logits(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [1.0, 0.5])
def test_a_soft_cap_of_one_or_less_is_a_cap_not_a_scale_of_one(cap):
    """softcap(x) = c * tanh(x / c) with c = 1 is tanh: a real cap, not the plain head."""
    fields = {k: v for k, v in BASE.items()} | dict(head_dim=8, final_logit_softcapping=cap)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **fields)).eval()
    b = batch()
    head = output_head(model)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    assert head.softcap == cap
    assert torch.allclose(head.logits(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("signal", ["cached", "online"])
@pytest.mark.parametrize("model_type", [t for t in ARCHS if t not in SLOW])
def test_chunked_loss_and_gradients_equal_the_dense_ones(model_type, signal):
    b = batch()
    compat = Compat("identical", V, True)
    teacher = tiny(model_type, seed=7) if signal == "online" else None
    results = []
    for chunk in (0, 5):
        model = tiny(model_type)
        model.train()
        spec = TrainSpec(chunk_size=chunk, kd_ratio=0.6, temperature=2.0, teacher_signal=signal)
        heads = model_heads(model, teacher) if chunk else None
        loss, ce, kd, _ = loss_sums(model, b, spec, compat, teacher, heads=heads)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), ce.item(), kd.item(), grads))
    (dense, d_ce, d_kd, d_grads), (chunked, c_ce, c_kd, c_grads) = results
    assert chunked == pytest.approx(dense, rel=1e-5, abs=1e-5)
    assert c_ce == pytest.approx(d_ce, rel=1e-5) and c_kd == pytest.approx(d_kd, rel=1e-5, abs=1e-5)
    assert d_grads.keys() == c_grads.keys()
    for name, g in d_grads.items():
        assert torch.allclose(c_grads[name], g, atol=1e-5, rtol=1e-4), name


class ShiftedLlama(LlamaForCausalLM):
    """A head no candidate describes: logits + 0.5 (a stand-in for an unknown architecture's transform)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + 0.5
        return out


def test_a_head_it_cannot_reproduce_is_refused_with_one_clear_error():
    fields = {k: v for k, v in BASE.items()}
    model = ShiftedLlama(AutoConfig.for_model("llama", **fields))
    with pytest.raises(PotstillError, match=r"cannot reproduce the student's logits \(ShiftedLlama.*train.chunk_size=0"):
        output_head(model)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_moe_students_router_loss_is_added_as_hugging_face_adds_it(model_type):
    """output_router_logits: the load-balancing loss joins the KD/CE mix as router_aux_loss_coef * aux_loss
    (per completion token, like the other terms), the same dense and chunked, gradients included;
    without output_router_logits nothing is added."""
    extra = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=16, router_aux_loss_coef=0.05)
    b = batch()
    n = int((b["labels"][:, 1:] != -100).sum())
    compat = Compat("identical", V, True)
    results = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **BASE, **extra, output_router_logits=True)
        model = AutoModelForCausalLM.from_config(config).train()
        spec = TrainSpec(chunk_size=chunk, kd_ratio=0.5)
        loss, ce, kd, router = loss_sums(model, b, spec, compat, heads=model_heads(model) if chunk else None)
        with torch.no_grad():
            hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).aux_loss
        assert router.item() == pytest.approx(hf.item() * n, rel=1e-5) and router.item() > 0
        assert loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * kd.item() + 0.05 * router.item(), rel=1e-5)
        loss.backward()
        gate = {k: p.grad.clone() for k, p in model.named_parameters() if "gate" in k and p.grad is not None}
        assert gate and all(g.abs().sum() > 0 for g in gate.values())
        results.append((loss.item(), gate))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for k, g in results[0][1].items():
        assert torch.allclose(results[1][1][k], g, atol=1e-5, rtol=1e-4), k

    config = AutoConfig.for_model(model_type, **BASE, **extra, output_router_logits=False)
    model = AutoModelForCausalLM.from_config(config)
    loss, ce, kd, router = loss_sums(model, b, TrainSpec(chunk_size=0, kd_ratio=0.5), compat)
    assert router.item() == 0 and loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * kd.item(), rel=1e-6)


def test_a_head_under_bf16_mixed_precision_is_checked_at_bf16_rounding():
    """accelerate runs a bf16 student's forward under autocast and hands its logits back as float32:
    float32's tolerance refused every such head (so bf16, the GPU default, could not chunk); the
    student's check now knows the logits carry bf16 rounding."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.errors import PotstillError
    from potstill.train.heads import output_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4))
    AcceleratorState._reset_state(reset_partial_state=False)
    prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    try:
        with pytest.raises(PotstillError, match="cannot reproduce"):
            output_head(prepared)  # float32's 1e-4: bf16's rounding is far above it
        head = output_head(prepared, half=True)
        assert head.weight.shape == (4096, 256)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
