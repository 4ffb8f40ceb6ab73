"""Train the small MoE language model that ships with the repo (`sere train-tiny`).

Text: the Python standard library's source (sere_dist.calibration.corpus), every 20th document held out.
Deterministic for a given corpus, seed and thread count. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from sere_dist.models.tiny import CHAT_TEMPLATE, DATA_DIR, TinySpec, build_model

TRAINED_DIR = DATA_DIR / "tiny-trained"
TRAINED_SPEC = TinySpec(family="qwen3_moe", hidden_size=128, num_layers=4, num_heads=2, num_experts=16,
                        top_k=4, expert_intermediate=128, max_positions=1024, seed=0)


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


def train(out: Path = TRAINED_DIR, steps: int = 1200, batch_size: int = 16, seq_len: int = 128,
          lr: float = 3e-3, seed: int = 0, spec: TinySpec = TRAINED_SPEC) -> dict:
    from sere_dist.calibration.corpus import split_corpus, stdlib_documents

    torch.manual_seed(seed)
    model, tok = build_model(spec, "random")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.01
    train_docs, held_docs = split_corpus(stdlib_documents())
    data = chunks(token_stream(tok, train_docs), seq_len)
    held = chunks(token_stream(tok, held_docs), seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    log = []
    model.train()
    bar = tqdm(range(steps), desc="train tiny MoE", unit="step")
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        x = data[idx]
        out_ = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": float(out_.loss), "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{float(out_.loss):.3f}")
    model.config.output_router_logits = False
    ppl = perplexity(model, held)
    result = {"heldout_ppl": ppl, "heldout_tokens": int(held.numel()), "train_tokens_seen": steps * batch_size * seq_len,
              "train_corpus_tokens": int(data.numel()), "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
              "lr": lr, "seed": seed, "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1),
              "spec": asdict(spec), "log": log}
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "sere_tiny.json").write_text(json.dumps({"kind": "trained", "spec": asdict(spec)}, indent=1))
    (out / "training.json").write_text(json.dumps(result, indent=1))
    return result
