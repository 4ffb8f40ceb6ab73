"""Train small MoE language models on Python stdlib text (`sere train-tiny`).

Text: the Python standard library's source (sere_dist.calibration.corpus), every 20th document held out.
Deterministic for a given corpus, recipe and thread count.

Three ways to get a model, matching how real MoE models were made:

    scratch     the MoE model trained from random weights (Qwen3-MoE, OLMoE: fine-grained, e.g.
                64 experts top-8)
    upcycle     train a dense model first, turn its FFN into E experts (with small noise), then
                continue training with the router (Qwen1.5-MoE was upcycled from a dense model).
                `copy`: every expert starts as the whole dense FFN; `split`: the dense FFN's hidden
                units are cut into E / copies slices, each slice an expert (down projection scaled so
                that k distinct slices sum to the dense FFN when k equals the number of slices)

The router's load-balancing loss weight is part of the model config when the model is built
(transformers reads it at construction). The router starts small (`router_init_scale` times the
default init), so early routing is near uniform and the balancing loss can act.

Shipped: sere_dist/data/tiny-trained (16 experts top-4; trained before the aux-coefficient fix, so it
trained with 0.001 although its config says 0.01, see its training.json), tiny-scratch64 (64 experts
top-8 from scratch), tiny-upcycled (16 experts top-4 upcycled from tiny-dense).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from sere_dist.models.tiny import CHAT_TEMPLATE, DATA_DIR, TinySpec, build_model, load_tokenizer

TRAINED_DIR = DATA_DIR / "tiny-trained"
TRAINED_SPEC = TinySpec(family="qwen3_moe", hidden_size=128, num_layers=4, num_heads=2, num_experts=16,
                        top_k=4, expert_intermediate=128, max_positions=1024, seed=0)
SCRATCH_DIR = DATA_DIR / "tiny-scratch64"
UPCYCLED_DIR = DATA_DIR / "tiny-upcycled"
DENSE_DIR = DATA_DIR / "tiny-dense"


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. `steps` counts MoE steps; with upcycling the dense model trains
    `dense_steps` first."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    aux_coef: float = 0.01
    router_init_scale: float = 0.1
    upcycle: Literal["copy", "split"] | None = None
    dense_steps: int = 600
    dense_intermediate: int | None = None     # split: the dense FFN width (default E/copies slices of I)
    upcycle_noise: float = 0.01               # relative noise added to each expert copy
    split_copies: int = 1                     # split: how many experts share each slice

    def check(self, spec: TinySpec) -> None:
        def bad(field, why):
            raise ValueError(f"{field} {why}")
        if self.steps < 1:
            bad("--steps", f"must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.seq_len < 2:
            bad("--batch-size/--seq-len", "must be >= 1 / >= 2")
        if not self.lr > 0:
            bad("--lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.aux_coef < 10:
            bad("--aux-coef", f"must be in [0, 10), got {self.aux_coef}")
        if not self.router_init_scale > 0:
            bad("--router-init-scale", f"must be > 0, got {self.router_init_scale}")
        if self.upcycle is not None:
            if self.dense_steps < 1:
                bad("--dense-steps", f"must be >= 1 when upcycling, got {self.dense_steps}")
            if self.upcycle == "split" and spec.num_experts % self.split_copies:
                bad("--split-copies", f"must divide --experts ({spec.num_experts}), got {self.split_copies}")
            if spec.family not in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe"):
                bad("--family", f"{spec.family} cannot be upcycled here (qwen3_moe, qwen2_moe, mixtral, olmoe)")


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    eos = tok.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False).input_ids)
        ids.append(eos)
    return torch.tensor(ids)


def chunks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, data.shape[0], batch_size):
        x = data[s:s + batch_size]
        logits = model(x).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def corpus_chunks(tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N, L], held-out [M, L]) token chunks of the stdlib corpus."""
    from sere_dist.calibration.corpus import split_corpus, stdlib_documents

    train_docs, held_docs = split_corpus(stdlib_documents())
    return chunks(token_stream(tok, train_docs), seq_len), chunks(token_stream(tok, held_docs), seq_len)


def _fit(model, data: torch.Tensor, steps: int, recipe: Recipe, desc: str, seed_offset: int = 0) -> list[dict]:
    """AdamW with warm-up and cosine decay; returns the loss log."""
    gen = torch.Generator().manual_seed(recipe.seed + seed_offset)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    log = []
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        idx = torch.randint(0, data.shape[0], (recipe.batch_size,), generator=gen)
        x = data[idx]
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            entry = {"step": step, "loss": round(out.loss.item(), 4), "elapsed_s": round(time.time() - t0, 1)}
            if getattr(out, "aux_loss", None) is not None:
                entry["aux_loss"] = round(out.aux_loss.item(), 4)
            log.append(entry)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    return log


def dense_model(spec: TinySpec, intermediate: int, tok):
    """A dense model with the MoE spec's attention, embeddings and norms (Qwen3 / Qwen2 / Mistral / OLMo)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    moe_cfg = _moe_config(spec, tok)
    common = dict(vocab_size=moe_cfg.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                  max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
                  eos_token_id=moe_cfg.eos_token_id, pad_token_id=moe_cfg.pad_token_id, bos_token_id=None,
                  rms_norm_eps=1e-6, intermediate_size=intermediate)
    cls = {"qwen3_moe": (tf.Qwen3Config, {"head_dim": spec.hidden_size // spec.num_heads}),
           "qwen2_moe": (tf.Qwen2Config, {}), "mixtral": (tf.MistralConfig, {}), "olmoe": (tf.OlmoConfig, {})}
    cfg_cls, extra = cls[spec.family]
    cfg = cfg_cls(**common, **extra)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1]) ** 0.5)
    return model


def _moe_config(spec: TinySpec, tok):
    from sere_dist.models.tiny import hf_config

    eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    return hf_config(spec, len(tok), eos, tok.pad_token_id)


@torch.no_grad()
def upcycle(dense, moe, recipe: Recipe) -> None:
    """Copy a dense model into an MoE model of the same shape: everything but the FFN is copied; each
    FFN becomes the experts (copy or split, plus relative noise); the router starts small."""
    from sere_dist.calibration.capture import moe_blocks

    dense_sd = dense.state_dict()
    missing, unexpected = moe.load_state_dict(
        {k: v for k, v in dense_sd.items() if ".mlp." not in k}, strict=False)
    wrong = [k for k in missing if ".mlp." not in k] + list(unexpected)
    if wrong:
        raise RuntimeError(f"dense and MoE models differ outside the FFN: {wrong[:5]}")
    gen = torch.Generator().manual_seed(recipe.seed + 7)
    layers = dense.model.layers
    for idx, blk in moe_blocks(moe).items():
        mlp = layers[idx].mlp
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight   # [Id, H], [Id, H], [H, Id]
        ex = blk.experts
        e, two_i, _ = ex.gate_up_proj.shape
        i = two_i // 2
        if recipe.upcycle == "copy":
            if g.shape[0] != i:
                raise RuntimeError(f"copy upcycling needs the dense FFN width ({g.shape[0]}) = expert width ({i})")
            gu = torch.cat([g, u], 0).expand(e, -1, -1)
            dn = d.expand(e, -1, -1)
        else:
            slices = e // recipe.split_copies
            if g.shape[0] != slices * i:
                raise RuntimeError(f"split upcycling needs dense width {slices * i} (= {slices} slices x {i}), "
                                   f"got {g.shape[0]}")
            which = torch.arange(e) % slices
            gs, us, ds = g.view(slices, i, -1), u.view(slices, i, -1), d.view(d.shape[0], slices, i).transpose(0, 1)
            k = blk.gate.top_k
            gu = torch.cat([gs, us], 1)[which]
            dn = ds[which] * (k if k <= slices else slices)
        for w, base in ((ex.gate_up_proj, gu), (ex.down_proj, dn)):
            noise = torch.randn(w.shape, generator=gen) * base.std() * recipe.upcycle_noise
            w.copy_(base + noise)
        blk.gate.weight.copy_(torch.randn(blk.gate.weight.shape, generator=gen)
                              * recipe.router_init_scale / blk.gate.weight.shape[-1] ** 0.5)


def _save(model, tok, out: Path, meta: dict, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "sere_tiny.json").write_text(json.dumps(meta, indent=1))
    (out / "training.json").write_text(json.dumps(result, indent=1))


def train(out: Path = TRAINED_DIR, spec: TinySpec = TRAINED_SPEC, recipe: Recipe = Recipe(),
          dense_out: Path | None = None) -> dict:
    """Train one model (scratch, or upcycled from a dense model trained first) and save it to `out`.

    Returns the training record (also written to out/training.json): held-out perplexity (and the dense
    parent's when upcycling), tokens, wall time, spec, recipe and the loss log.
    """
    recipe.check(spec)
    spec = replace(spec, router_aux_loss_coef=recipe.aux_coef)
    tok = load_tokenizer()
    data, held = corpus_chunks(tok, recipe.seq_len)
    t0 = time.time()
    result: dict = {"recipe": asdict(recipe), "spec": asdict(spec), "threads": torch.get_num_threads(),
                    "heldout_tokens": int(held.numel()), "train_corpus_tokens": int(data.numel())}
    torch.manual_seed(recipe.seed)
    model, _ = build_model(spec, "random", router_scale=recipe.router_init_scale)
    if recipe.upcycle is not None:
        width = recipe.dense_intermediate or (spec.expert_intermediate if recipe.upcycle == "copy" else
                                              spec.expert_intermediate * spec.num_experts // recipe.split_copies)
        dense = dense_model(spec, width, tok)
        result["dense_log"] = _fit(dense, data, recipe.dense_steps, recipe, "train dense FFN model")
        result["dense_heldout_ppl"] = perplexity(dense, held)
        result["dense_intermediate"] = width
        if dense_out is not None:
            _save(dense, tok, Path(dense_out), {"kind": "dense", "intermediate": width, "spec": asdict(spec)},
                  {"heldout_ppl": result["dense_heldout_ppl"], "steps": recipe.dense_steps,
                   "log": result["dense_log"], "recipe": asdict(recipe)})
        upcycle(dense, model, recipe)
        result["upcycled_init_heldout_ppl"] = perplexity(model, held)
    model.config.output_router_logits = True
    result["log"] = _fit(model, data, recipe.steps, recipe, "train MoE model", seed_offset=1)
    model.config.output_router_logits = False
    result["heldout_ppl"] = perplexity(model, held)
    result["wall_s"] = round(time.time() - t0, 1)
    kind = "trained" if recipe.upcycle is None else f"upcycled-{recipe.upcycle}"
    _save(model, tok, Path(out), {"kind": kind, "spec": asdict(spec)}, result)
    return result
