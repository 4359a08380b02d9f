"""Worker for the end-to-end test: Megatron's own ``pretrain()`` with ``--optimizer muon``.

Runs in a spawned gloo world (megatron-core 0.19, which carries ``megatron/training``). The
script-side code is what a user's ``pretrain_gpt.py`` would hold: providers for the model and a
random-token dataset, and a forward step; ``muon_megatron.megatron.install()`` is called first,
exactly as a custom script would.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

LOSSES: list[float] = []


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (a small repeated set, so the loss can fall in a few steps)."""

    def __init__(self, num_samples, seq_length, vocab_size, distinct=8):
        g = torch.Generator().manual_seed(7)
        self.samples = torch.randint(0, vocab_size, (distinct, seq_length + 1), generator=g)
        self.num_samples = num_samples

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        return {"text": self.samples[index % len(self.samples)]}


def model_provider(pre_process=True, post_process=True, config=None, pg_collection=None, vp_stage=None, **kwargs):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def datasets_provider(train_val_test_num_samples, *args, **kwargs):
    from megatron.training import get_args

    a = get_args()
    return RandomTokens(train_val_test_num_samples[0], a.seq_length, a.padded_vocab_size), None, None


def loss_func(output_tensor):
    loss = output_tensor.float().sum()
    tokens = torch.tensor(output_tensor.numel(), dtype=torch.int)
    LOSSES.append(float(loss) / output_tensor.numel())
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


def forward_step(data_iterator, model, *args, **kwargs):
    batch = next(data_iterator)["text"]
    inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    output = model(inputs, position_ids, None, labels=labels)
    return output, partial(loss_func)


ARGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "48", "--swiglu", "--disable-bias-linear",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--seq-length", "16",
    "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--train-iters", "12", "--lr", "0.02", "--min-lr", "0.02", "--lr-decay-style", "constant",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--optimizer", "muon", "--muon-ns-dtype", "float32",
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--use-cpu-initialization",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "63", "--mock-data", "--log-interval", "1",
    "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234", "--num-workers", "0",
]


def pretrain_worker(rank, world, extra_args):
    from megatron.core.enums import ModelType

    import muon_megatron.megatron as mm

    mm.install()
    from muon_megatron.megatron import factory

    build = factory.get_muon_optimizer

    def recording(*a, **k):
        _OPT.append(build(*a, **k))
        return _OPT[-1]

    factory.get_muon_optimizer = recording
    torch.cuda.is_available = lambda: True  # pretrain() asserts CUDA; the CPU shim stands in for it
    torch.cuda.device_count = lambda: 1  # so that pretrain() initialises model parallelism
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # the data loader pins when CUDA "is available"
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None  # the C++ index helpers serve Megatron's datasets, unused here
    sys.argv = ["pretrain_test.py", *ARGS, *extra_args]
    from megatron.training import arguments as training_arguments
    from megatron.training import training

    training.set_jit_fusion_options = lambda *a, **k: None  # warms up CUDA fusions; nothing to fuse on the CPU
    args = training_arguments.parse_and_validate_args()
    cfg = _cfg_container(args)
    training.pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    from megatron.training import get_args

    chained = _optimizer()
    inner = [(type(o).__name__, type(o.optimizer).__name__) for o in chained.chained_optimizers] if chained else []
    return {"losses": list(LOSSES), "use_distributed_optimizer": get_args().use_distributed_optimizer,
            "overlap_param_gather": get_args().overlap_param_gather, "optimizer": get_args().optimizer,
            "wrappers": inner}


_OPT = []


def _optimizer():
    return _OPT[0] if _OPT else None


def _cfg_container(args):
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    return pretrain_cfg_container_from_args(args)
