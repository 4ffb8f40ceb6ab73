"""Tiny Mixture-of-Experts checkpoints written locally (no model hub): random, planted, trained.

Each is a valid Hugging Face checkpoint with a tokenizer and a chat template, loadable by
`transformers` and by vLLM. Families: qwen3_moe, qwen2_moe (with a shared expert), mixtral, olmoe,
deepseek_v2 (MLA attention; shared experts).

planted: within every MoE layer the experts form clusters (members differ by small noise), so a
calibration must recover the clusters, and re-routing inside a cluster barely changes the output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("sere_dist")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # sere_dist/data: shipped checkpoints and tokenizer
TOKENIZER_DIR = DATA_DIR / "tokenizer"
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny MoE model. hidden_size must be a multiple of 32 (vLLM CPU MoE kernel)."""

    family: str = "qwen3_moe"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_experts: int = 16
    top_k: int = 4
    expert_intermediate: int = 64
    max_positions: int = 1024
    num_clusters: int = 4            # planted only
    cluster_noise: float = 0.05      # planted only: relative noise between cluster members
    seed: int = 0
    router_aux_loss_coef: float | None = None   # load-balancing loss weight; None keeps the family's default


def train_tokenizer(out_dir: Path = TOKENIZER_DIR, vocab_size: int = 2048) -> Path:
    """Byte-level BPE trained on the stdlib corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sere_dist.calibration.corpus import split_corpus, stdlib_documents

    train_docs, _ = split_corpus(stdlib_documents())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path: Path | str = TOKENIZER_DIR):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        train_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def hf_config(spec: TinySpec, vocab_size: int, eos_ids: list[int], pad_id: int):
    """A transformers config object for the spec's family."""
    import transformers as tf

    h, n_e, k, i_e = spec.hidden_size, spec.num_experts, spec.top_k, spec.expert_intermediate
    head_dim = h // spec.num_heads
    common = dict(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                  max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
                  eos_token_id=eos_ids[0], pad_token_id=pad_id, bos_token_id=None, rms_norm_eps=1e-6,
                  torch_dtype="float32")
    fam = spec.family
    if fam == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=head_dim, intermediate_size=2 * i_e, moe_intermediate_size=i_e,
                                num_experts=n_e, num_experts_per_tok=k, norm_topk_prob=True,
                                decoder_sparse_step=1, mlp_only_layers=[])
        arch = "Qwen3MoeForCausalLM"
    elif fam == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=2 * i_e, moe_intermediate_size=i_e,
                                shared_expert_intermediate_size=i_e, num_experts=n_e, num_experts_per_tok=k,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
        arch = "Qwen2MoeForCausalLM"
    elif fam == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=i_e, num_local_experts=n_e, num_experts_per_tok=k)
        arch = "MixtralForCausalLM"
    elif fam == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=i_e, num_experts=n_e, num_experts_per_tok=k,
                             norm_topk_prob=False)
        arch = "OlmoeForCausalLM"
    elif fam == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**common, intermediate_size=2 * i_e, moe_intermediate_size=i_e,
                                  n_routed_experts=n_e, num_experts_per_tok=k, n_shared_experts=1,
                                  first_k_dense_replace=0, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
                                  qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=64, n_group=1,
                                  topk_group=1, topk_method="greedy", routed_scaling_factor=1.0,
                                  norm_topk_prob=False, scoring_func="softmax")
        arch = "DeepseekV2ForCausalLM"
    else:
        raise ValueError(f"unknown family {fam!r}; use one of {', '.join(FAMILIES)}")
    if spec.router_aux_loss_coef is not None:
        # transformers reads it when the model is built: it must be in the config passed to from_config
        cfg.router_aux_loss_coef = spec.router_aux_loss_coef
        if fam == "deepseek_v2":
            cfg.aux_loss_alpha = spec.router_aux_loss_coef
    cfg.architectures = [arch]
    return cfg


def build_model(spec: TinySpec, kind: str = "random", router_scale: float = 4.0):
    """In-memory transformers model (random or planted weights) and its tokenizer. The routers start at
    `router_scale` times the default init (4: confident, diverse routing; training starts smaller)."""
    from transformers import AutoModelForCausalLM

    from sere_dist.calibration.capture import moe_blocks

    if kind not in ("random", "planted"):
        raise ValueError(f"kind must be random or planted here (trained: `sere train-tiny`), got {kind!r}")
    tok = load_tokenizer()
    eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    cfg = hf_config(spec, len(tok), eos, tok.pad_token_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    clusters: dict[int, list[int]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # a visible, well-scaled random init
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1]) ** 0.5)
        for idx, block in moe_blocks(model).items():
            ex = block.experts
            block.gate.weight.mul_(router_scale)
            if kind == "planted":
                labels = torch.randperm(spec.num_experts, generator=gen) % spec.num_clusters
                clusters[idx] = labels.tolist()
                for w in (ex.gate_up_proj, ex.down_proj):
                    base = torch.randn((spec.num_clusters,) + tuple(w.shape[1:]), generator=gen) * (1.0 / w.shape[-1]) ** 0.5
                    noise = torch.randn(w.shape, generator=gen) * (1.0 / w.shape[-1]) ** 0.5 * spec.cluster_noise
                    w.copy_(base[labels] + noise)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model._sere_clusters = clusters
    return model, tok


def write_checkpoint(out: str | Path, spec: TinySpec = TinySpec(), kind: str = "random",
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny checkpoint (config, safetensors weights, tokenizer, chat template) to `out`."""
    out = Path(out)
    model, tok = build_model(spec, kind)
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    meta = {"kind": kind, "spec": asdict(spec)}
    if kind == "planted":
        meta["clusters"] = {str(k): v for k, v in model._sere_clusters.items()}
    (out / "sere_tiny.json").write_text(json.dumps(meta, indent=1))
    return out


def planted_clusters(path: str | Path) -> dict[int, list[int]]:
    meta = json.loads((Path(path) / "sere_tiny.json").read_text())
    return {int(k): v for k, v in meta.get("clusters", {}).items()}
