"""Training-step benchmark of a registered model: non-private and private (privacy engine).

    python -m models.bench --model dpcap_base --batch 128 --dtype bf16 --device cuda
    python -m models.bench --model dpcap_nano --batch 8 --dtype fp32 --device cpu \\
        --set img_size=64 --set depth=2 --set decoder_depth=2 --steps 3

Random data at full caption length (no padding), AdamW, autocast in ``--dtype``.
Reports the step time, images/s, training FLOPs per example (forward + backward,
counted by torch.utils.flop_counter), the achieved FLOP rate and MFU against
``--peak-tflops`` (default 797: an H100's measured 8192^3 bf16 matrix rate), and the
private step (book-keeping clipping, noise on) relative to the non-private one.
"""

import argparse
import ast
import json
import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import DPCap, create_model
from models.tokenizer import BOS_ID, EOS_ID
from privacy.bench import measure
from privacy.engine import PrivacyEngine

logger = logging.getLogger("models.bench")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _batch(model, batch: int, device: torch.device, gen: torch.Generator) -> tuple:
    c = model.config
    images = torch.randn(batch, 3, c.img_size, c.img_size, generator=gen).to(device)
    if not isinstance(model, DPCap):
        return (images,)
    tokens = torch.randint(1, c.vocab_size, (batch, c.text_max_length), generator=gen)  # no PAD
    tokens[:, 0], tokens[:, -1] = BOS_ID, EOS_ID
    return images, tokens.to(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dpcap_base", help="registered model name")
    p.add_argument("--batch", type=int, default=128, help="micro-batch (images per step)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    p.add_argument("--peak-tflops", type=float, default=797.0, help="the device's matrix rate for MFU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the non-private step")
    p.add_argument("--no-private", action="store_true", help="skip the private step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = ast.literal_eval(value)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model(args.model, **overrides).to(device)
    inputs = _batch(model, args.batch, device, gen)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.005, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with FlopCounterMode(display=False) as counter, autocast:
        model(*inputs).mean().backward()
    flops = counter.get_total_flops() / args.batch  # training FLOPs per example
    opt.zero_grad(set_to_none=True)

    run = torch.compile(model) if args.compile else model

    def plain_step():
        with autocast:
            loss = run(*inputs)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def private_step():
        with autocast:
            loss = model(*inputs)
        engine.backward(loss)
        engine.finish_step()
        opt.step()
        engine.zero_grad()

    on_cuda = device.type == "cuda"
    result = {
        "model": args.model, "overrides": overrides, "batch": args.batch, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if on_cuda else f"cpu ({torch.get_num_threads()} threads)",
        "trainable_params": sum(q.numel() for q in params), "gflop_per_example": flops / 1e9,
    }
    modes = {"plain": plain_step} if args.no_private else {"plain": plain_step, "private": private_step}
    for mode, step in modes.items():
        if mode == "private":
            engine = PrivacyEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=args.batch)
        t, peak_gib = measure(step, args.steps, args.warmup, device)
        rate = flops * args.batch / t
        result[mode] = {
            "step_s": t, "images_per_s": args.batch / t, "tflop_per_s": rate / 1e12,
            "mfu": rate / (args.peak_tflops * 1e12),
        }
        if peak_gib is not None:
            result[mode]["peak_gib"] = peak_gib
        logger.info("%-8s step %.4g s  %.4g img/s  %.3g TFLOP/s  MFU %.3g%%",
                    mode, t, args.batch / t, rate / 1e12, 100 * result[mode]["mfu"])
    if "private" in result:
        result["private_over_plain"] = result["plain"]["step_s"] / result["private"]["step_s"]
    logger.info("%s", json.dumps(result))
    return result


if __name__ == "__main__":
    main()
