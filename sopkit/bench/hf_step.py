"""The cost of one majority-kernels fine-tuning step against plain fine-tuning, for a small random
T5 (T5ForSequenceClassification) on the CPU, measured through the training loop's own step
(``TrainingState.step``: hooks, backward, Adam, schedule), as ``sopkit bench`` measures its models.

    uv run python -m sopkit.bench.hf_step [--d-model 64] [--layers 2] [--batch 16] [--length 32]

It builds the model offline in a temporary directory (nothing is downloaded), then times, in turns,
``--rounds`` rounds of ``--steps`` steps of ``baseline`` and ``mk`` (e = 3, replicate) on the same
random token batch, after ``--warmup`` steps each, with one torch thread; prints the median step
times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("d-model", 64), ("layers", 2), ("batch", 16), ("length", 32),
                          ("vocab", 512), ("steps", 10), ("rounds", 5), ("warmup", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()

    import torch
    import transformers

    from sopkit.data import DataSplits, TensorSplit
    from sopkit.models import build_model
    from sopkit.registry import create_strategy
    from sopkit.training.config import TrainConfig
    from sopkit.training.loop import TrainingState
    from sopkit.training.settings import StrategySettings
    from sopkit.training.types import RunContext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=4 * args.d_model,
        num_layers=args.layers, num_heads=4, pad_token_id=0, eos_token_id=1,
        # Accepted through PretrainedConfig's **kwargs, which T5Config's typed signature omits.
        decoder_start_token_id=0,  # type: ignore[call-arg]
    )
    directory = tempfile.mkdtemp(prefix="sopkit-hf-step-")
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    ids = torch.randint(2, args.vocab, (args.batch, args.length))
    ids[:, -1] = 1  # one eos per example, as T5ForSequenceClassification requires
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    y = torch.randint(0, 2, (args.batch,))
    split = TensorSplit(x, y)
    data = DataSplits("synthetic", (2, args.length), 2, split, split, split)
    train = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4)
    device = torch.device("cpu")
    states = {}
    for name in ("baseline", "mk"):
        torch.manual_seed(0)
        model = build_model(f"hf:{directory}", input_shape=(2, args.length), num_classes=2)
        total = args.warmup + args.rounds * args.steps
        run = RunContext(0, train, device, data, torch.Generator().manual_seed(0), total)
        strategy = create_strategy(name, StrategySettings(3, {}, name))
        states[name] = TrainingState.start(strategy, model, run)
        states[name].model.train()
        for _ in range(args.warmup):
            states[name].step(x, y)
    times: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(args.rounds):  # in turns, so both see the same machine load
        for name, state in states.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                state.step(x, y)
            times[name].append((time.perf_counter() - started) / args.steps)
    params = sum(p.numel() for p in states["baseline"].model.parameters())
    print(f"T5 d_model={args.d_model} layers={args.layers} ({params / 1e6:.2f}M parameters), "
          f"batch {args.batch} x {args.length} tokens, 1 thread, e = 3")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:9s} median step {median * 1e3:8.2f} ms  (rounds: "
              + ", ".join(f"{t * 1e3:.1f}" for t in times[name]) + ")")
    print(f"  mk / baseline: {medians['mk'] / medians['baseline']:.2f}x")


if __name__ == "__main__":
    main()
