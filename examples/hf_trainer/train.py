"""A tiny Llama trained by the Hugging Face Trainer with a DeepSpeed JSON whose optimizer is
``"type": "muon"`` (``ds_zero1.json``), on the Python standard library's own sources as bytes
(nothing is downloaded). The script is plain Trainer code: it does not import muon_megatron.
Launch it through muon_megatron's DeepSpeed launcher so that ``"muon"`` means Moonlight's Muon:

    torchrun --nproc-per-node 2 -m muon_megatron.deepspeed.launch examples/hf_trainer/train.py
    muon-megatron deepspeed examples/hf_trainer/train.py                 # one process

On a machine without a GPU set ``DS_ACCELERATOR=cpu`` (gloo). ``TrainingArguments``' learning rate,
weight decay, ``adam_beta1/2`` and ``adam_epsilon`` fill the JSON's ``"auto"`` values: the betas and
eps are those of the AdamW half (embeddings, head, norms). ``--record DIR`` saves, per rank, the
initial weights and the batches each step saw, so a test can recompute the update (see
``tests/deepspeed/test_hf_trainer_example.py``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ = 64


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A byte-level Llama: 2 layers, hidden 64, 4 query heads sharing 2 key/value heads, SwiGLU."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def stdlib_windows(count: int, seed: int = 0) -> list[dict]:
    """``count`` windows of ``SEQ`` bytes of the standard library's ``.py`` files."""
    from muon_megatron.demo.data import load_corpus, sample_batch

    train, _, _ = load_corpus(2_000_000)
    tokens = sample_batch(train, count, SEQ - 1, torch.Generator().manual_seed(seed))
    return [{"input_ids": t, "labels": t} for t in tokens]


class RecordingTrainer(Trainer):
    """The Trainer, keeping every batch this rank trained on (for --record)."""

    seen: list = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(inputs["input_ids"].detach().cpu())
        return super().compute_loss(model, inputs, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hf_trainer")
    parser.add_argument("--deepspeed-config", default=os.path.join(HERE, "ds_zero1.json"))
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--adam-beta2", type=float, default=0.95, help="TrainingArguments.adam_beta2 (Moonlight: 0.95)")
    parser.add_argument("--ns-dtype", help="override optimizer.params.ns_dtype (float32 for exact checks)")
    parser.add_argument("--record", help="folder for each rank's initial weights and batches")
    args = parser.parse_args()

    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    if args.ns_dtype:
        ds_config["optimizer"]["params"]["ns_dtype"] = args.ns_dtype
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=args.lr,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=args.adam_beta2, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to="none",
        deepspeed=ds_config, seed=0, data_seed=0,
    )
    model = build_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_class = RecordingTrainer if args.record else Trainer
    trainer = trainer_class(model=model, args=training, train_dataset=stdlib_windows(64))
    trainer.train()
    if args.record:
        rank = int(os.environ.get("RANK", "0"))
        os.makedirs(args.record, exist_ok=True)
        optimizer = trainer.deepspeed.optimizer
        torch.save({
            "initial": initial,
            "final": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "batches": RecordingTrainer.seen,
            "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
            "wrapper": type(optimizer).__name__,
            "groups": [{k: v for k, v in g.items() if k in ("names", "use_muon", "lr", "weight_decay", "adamw_betas",
                                                          "adamw_eps", "ns_dtype")}
                       for g in getattr(optimizer, "optimizer", optimizer).param_groups],
        }, os.path.join(args.record, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
